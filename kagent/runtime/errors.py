"""SetupError: one failed step of building a container, with what a person needs.

The container's set-up runs in a forked child, so an error must survive a trip
over a socket: it is reduced to plain fields (kind, step, path, errno, message)
and rebuilt in the parent.  ``step()`` turns an OSError raised by a syscall
wrapper into a SetupError that names the step ("mount proc at /r/proc") and the
path.  A SetupError is a domain error: INTERNAL, or INVALID_ARGUMENT for an
InvalidSpec; ``kind`` (its status code's name) is what travels.

Whether a kernel error is the host's mistake depends on the call, not on the errno
alone (EINVAL from mounting a spec's tmpfs is, from pivot_root it is ours), so each
step names the errnos that mean "the spec asked for what cannot be" (the sets below);
``step()`` is the one place that turns them into an InvalidSpec.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
from collections.abc import Collection, Iterator

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
        self.killed_by: int | None = None  # the signal that ended the child, when that was the failure

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


#: A path the spec gave (root.path, a bind source, process.cwd) does not lead anywhere.
NO_SUCH_PATH = frozenset({E.ENOENT, E.ENOTDIR, E.ELOOP, E.ENAMETOOLONG})
#: mount(2) of a spec's filesystem: its options (EINVAL), type (ENODEV) or source refused.
BAD_MOUNT = NO_SUCH_PATH | {E.EINVAL, E.ENODEV, E.ENOTBLK, E.ENXIO}
#: A mount destination that is, or passes through, something other than a directory.
BAD_MOUNT_POINT = frozenset({E.EEXIST, E.ENOTDIR, E.ELOOP, E.ENAMETOOLONG})
#: setns(2) on a namespace path: not there, or not a namespace of that type (EINVAL).
BAD_NAMESPACE = NO_SUCH_PATH | {E.EINVAL}
#: A setting the kernel does not take: a sysctl's value, a hostname over 64 bytes.
BAD_VALUE = frozenset({E.EINVAL, E.ERANGE})
#: execve(2) of process.args[0]: missing, not executable, not a format the kernel runs.
BAD_EXEC = NO_SUCH_PATH | {E.EACCES, E.ENOEXEC, E.E2BIG, E.EISDIR, E.ELIBBAD, E.EINVAL}


def check_no_nul(value: object, where: str) -> None:
    """Refuse a NUL byte in any string of ``value`` (a spec section): os.* would raise
    ValueError deep in the child, and a string passed through ctypes would be cut short."""
    if isinstance(value, str):
        if "\0" in value:
            raise InvalidSpec("spec", f"spec: {where} contains a NUL byte: {value!r}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_no_nul(key, f"{where} key")
            check_no_nul(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_no_nul(item, f"{where}[{i}]")


@contextlib.contextmanager
def step(name: str, path: str | None = None, *, invalid: Collection[int] = ()) -> Iterator[None]:
    """Name the step that the enclosed syscalls belong to; an OSError whose errno is in
    ``invalid`` is the spec's fault (InvalidSpec), any other one a failed step (INTERNAL)."""
    try:
        yield
    except SetupError:
        raise
    except OSError as exc:
        cls = InvalidSpec if exc.errno in invalid else SetupError
        raise cls.from_oserror(name, exc, path) from exc
