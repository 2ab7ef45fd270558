"""SetupError: one failed step of building a container, with what a person needs.

The container's set-up runs in a forked child, so an error must survive a trip
over a socket: it is reduced to plain fields (kind, step, path, errno, message)
and rebuilt in the parent.  ``step()`` turns an OSError raised by a syscall
wrapper into a SetupError that names the step ("mount proc at /r/proc") and the
path.  A SetupError is a domain error: INTERNAL, or INVALID_ARGUMENT for an
InvalidSpec; ``kind`` (its status code's name) is what travels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kagent.errors import AgentError, InvalidArgument
from kagent.ttrpc.codes import Code


class SetupError(AgentError):
    """A container set-up step failed.

    ``str(err)`` reads like "mount proc at /r/proc: [Errno 1] Operation not
    permitted"; ``detail`` keeps the syscall wrapper's own text.
    """

    def __init__(
        self,
        step: str,
        message: str | None = None,
        *,
        path: str | None = None,
        errno: int | None = None,
        detail: str | None = None,
        code: Code | None = None,
    ) -> None:
        if message is None:
            message = f"{step}: [Errno {errno}] {os.strerror(errno)}" if errno else step
        super().__init__(message, code=code)
        self.step = step
        self.path = path
        self.errno = errno
        self.detail = detail

    @classmethod
    def from_oserror(cls, step: str, exc: OSError, path: str | None = None) -> SetupError:
        errno = exc.errno
        reason = os.strerror(errno) if errno else str(exc)
        if exc.filename and str(exc.filename) not in step:
            reason += f": {exc.filename!r}"  # a step that does not name its path gets it here
        return cls(
            step,
            f"{step}: [Errno {errno}] {reason}",
            path=path if path is not None else exc.filename,
            errno=errno,
            detail=str(exc),
        )

    def __reduce__(self):  # keep the fields across pickling (zygote/worker messages, tests)
        return (SetupError.from_dict, (self.to_dict(),))

    def to_dict(self) -> dict:
        return {
            "kind": self.code.name,
            "step": self.step,
            "message": self.message,
            "path": self.path,
            "errno": self.errno,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SetupError:
        return cls(
            str(d.get("step", "set-up")),
            d.get("message"),
            path=d.get("path"),
            errno=d.get("errno"),
            detail=d.get("detail"),
            code=Code.__members__.get(str(d.get("kind"))),  # unknown: the class's own (INTERNAL)
        )


class InvalidSpec(SetupError, InvalidArgument):
    """The spec (or an exec's process) asks for what no set-up can do: the host's mistake."""


def check_range(field: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in low..high, or InvalidSpec naming ``field`` (before a syscall's
    C type would refuse it deep in the child, as an OverflowError or struct.error)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec("spec", f"spec: {field} must be an integer in {low}..{high}, not {value!r}")
    return value


@contextlib.contextmanager
def step(name: str, path: str | None = None) -> Iterator[None]:
    """Name the step that the enclosed syscalls belong to."""
    try:
        yield
    except SetupError:
        raise
    except OSError as exc:
        raise SetupError.from_oserror(name, exc, path) from exc
