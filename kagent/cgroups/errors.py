"""Cgroup errors: the write error both write twins raise, and the one place
where a failed cgroup write becomes a domain error (and so a gRPC code)."""

from __future__ import annotations

import errno as _errno
import os

from kagent import errors


class CgroupWriteError(OSError):
    """A cgroup file refused a value.  ``str()`` names the file and the value.

    ``done`` is how many writes of the batch had succeeded before this one, so
    a caller knows exactly what was applied.
    """

    def __init__(self, err: int, path: str, value: str, done: int = 0) -> None:
        super().__init__(err, f"cannot write {value!r} to {path}: {os.strerror(err)}")
        self.path = path
        self.value = value
        self.done = done

    def __reduce__(self):  # keep the fields across pickling (worker → supervisor)
        return (type(self), (self.errno, self.path, self.value, self.done))


# errno → the domain error a handler should answer with.  EINVAL/ERANGE: the
# kernel refused the value; ENODEV: a device rule (blkio throttle, weight) names a
# device the guest does not have; EBUSY: the cgroup's state forbids it now (children,
# an attached task); ENOSPC: cpuset without cpus/mems, or a hierarchy limit.
_DOMAIN = {
    _errno.EINVAL: errors.InvalidArgument,
    _errno.ENODEV: errors.InvalidArgument,
    _errno.ERANGE: errors.InvalidArgument,
    _errno.EOVERFLOW: errors.InvalidArgument,
    _errno.EBUSY: errors.FailedPrecondition,
    _errno.ENOSPC: errors.FailedPrecondition,
    _errno.ENOENT: errors.NotFound,
    _errno.EPERM: errors.PermissionDenied,
    _errno.EACCES: errors.PermissionDenied,
}


def to_domain(exc: OSError, what: str = "") -> errors.AgentError:
    """The domain error for a failed cgroup operation, with a message a person can act on."""
    cls = _DOMAIN.get(exc.errno or 0, errors.AgentError)
    text = str(exc) if isinstance(exc, CgroupWriteError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return cls(f"{what}: {text}" if what else text)
