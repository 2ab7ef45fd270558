"""Domain errors: raised by the agent's parts, mapped to a gRPC status once, in
kagent.ttrpc.status.  Each carries the status code it stands for, so a handler
never picks a code itself."""

from __future__ import annotations

import errno

from kagent.ttrpc.codes import Code


class AgentError(Exception):
    """Base of the errors that cross the RPC boundary with a chosen code."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(AgentError):
    code = Code.INVALID_ARGUMENT


class NotFound(AgentError):
    code = Code.NOT_FOUND


class AlreadyExists(AgentError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(AgentError):
    code = Code.FAILED_PRECONDITION


class PermissionDenied(AgentError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(AgentError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(AgentError):
    code = Code.UNAVAILABLE


class Unimplemented(AgentError):
    code = Code.UNIMPLEMENTED


class DeadlineExceeded(AgentError):
    code = Code.DEADLINE_EXCEEDED


def refuse_nul(value: str, what: str) -> str:
    """``value`` (a path or other string the host sent for the kernel), if it holds no NUL byte.

    A C string ends at NUL: os.* would raise ValueError (INTERNAL), and a string passed
    through ctypes would silently be cut short.
    """
    if "\0" in value:
        raise InvalidArgument(f"{what} {value!r} contains a NUL byte")
    return value


def os_error(exc: OSError, what: str) -> AgentError:
    """An OSError from the kernel → the domain error that names what failed."""
    text = f"{what}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return NotFound(text)
    if isinstance(exc, PermissionError):
        return PermissionDenied(text)
    if exc.errno in (errno.EINVAL, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return InvalidArgument(text)
    return AgentError(text)
