"""SetupError: one failed step of building a container, with what a person needs.

The container's set-up runs in a forked child, so an error must survive a trip
over a socket: it is reduced to plain fields (step, path, errno, message) and
rebuilt in the parent.  ``step()`` turns an OSError raised by a syscall wrapper
into a SetupError that names the step ("mount proc at /r/proc") and the path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class SetupError(Exception):
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
    ) -> None:
        if message is None:
            message = f"{step}: [Errno {errno}] {os.strerror(errno)}" if errno else step
        super().__init__(message)
        self.step = step
        self.path = path
        self.errno = errno
        self.message = message
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
        )


@contextlib.contextmanager
def step(name: str, path: str | None = None) -> Iterator[None]:
    """Name the step that the enclosed syscalls belong to."""
    try:
        yield
    except SetupError:
        raise
    except OSError as exc:
        raise SetupError.from_oserror(name, exc, path) from exc
