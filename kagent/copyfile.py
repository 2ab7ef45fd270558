"""CopyFile: a file, directory or symlink written strictly below the shared directory.

Without a shared filesystem (shared_fs=none) the host copies each container's files
into /run/kata-containers/shared/containers/ with this RPC, a file in chunks.
The host names the path, so nothing it names may reach outside that directory:

- the path is checked lexically first: absolute, below the base, no ``..``;
- it is then walked one component at a time from a descriptor of the base, with
  ``openat(O_NOFOLLOW | O_DIRECTORY)``, so a symlink anywhere on the way (a link
  inside the base pointing out, a link swapped in by a racing writer) is refused
  rather than followed; every later call works on descriptors, never on paths.
- the final name is written through ``<name>.tmp`` opened with O_NOFOLLOW and
  renamed into place once ``offset + len(data)`` reaches ``file_size``: a
  symlink at the final name is replaced, never written through.

A symlink the host asks for may point anywhere (as upstream): it is created, never
followed by this module.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass

from kagent.errors import InvalidArgument, PermissionDenied, os_error, refuse_nul
from kagent.guest import SHARED_DIR
from kagent.log import get_logger

log = get_logger("copyfile")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PARENT_MASK = 0o777  # implicitly created parents: permission bits only
_MODE_MASK = 0o7777  # the target: permissions plus setuid/setgid/sticky


@dataclass(frozen=True)
class CopyRequest:
    path: str
    file_size: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    uid: int = 0
    gid: int = 0
    offset: int = 0
    data: bytes = b""


def components_below(base: str, path: str) -> list[str]:
    """The components of ``path`` under ``base`` (lexically); refuse anything else."""
    if not path:
        raise InvalidArgument("CopyFile: empty path")
    refuse_nul(path, "CopyFile: path")
    if not path.startswith("/"):
        raise InvalidArgument(f"CopyFile: path {path!r} is not absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PermissionDenied(f"CopyFile: path {path!r} contains '..'")
    base_parts = [p for p in base.split("/") if p not in ("", ".")]
    if len(parts) <= len(base_parts) or parts[: len(base_parts)] != base_parts:
        raise PermissionDenied(f"CopyFile: path {path!r} is not below {base}")
    return parts[len(base_parts):]


def _refuse_link(parent: int, name: str, path: str) -> None:
    """After ELOOP/ENOTDIR on a walk step: say precisely what was in the way."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"CopyFile: {path}: component {name!r} is a symlink")
    raise InvalidArgument(f"CopyFile: {path}: component {name!r} is not a directory")


def _open_parent(base: str, names: list[str], dir_mode: int, path: str) -> int:
    """A descriptor of the directory that will hold the target, creating missing ones."""
    try:
        os.makedirs(base, mode=0o755, exist_ok=True)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, f"CopyFile: open {base}") from None
    for name in names:
        try:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # created meanwhile: the open below checks what it is
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(child, dir_mode & _PARENT_MASK)  # exactly dir_mode, whatever the umask
        except OSError as exc:
            try:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    _refuse_link(fd, name, path)
                raise os_error(exc, f"CopyFile: {path}: open {name}") from None
            finally:
                os.close(fd)
        os.close(fd)
        fd = child
    return fd


def _remove(parent: int, name: str) -> None:
    """Remove whatever is at ``name`` (a directory with its tree), following no symlink."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent)  # fd-based walk: does not follow symlinks
    else:
        os.unlink(name, dir_fd=parent)


def _make_dir(parent: int, name: str, req: CopyRequest) -> None:
    try:
        os.unlink(name, dir_fd=parent)  # a file or link in the way goes; a directory stays
    except (FileNotFoundError, IsADirectoryError):
        pass
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        pass
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        os.fchown(fd, req.uid, req.gid)
        os.fchmod(fd, req.file_mode & _MODE_MASK)
    finally:
        os.close(fd)


def _make_symlink(parent: int, name: str, req: CopyRequest) -> None:
    if not req.data or b"\0" in req.data:
        raise InvalidArgument(f"CopyFile: symlink {req.path} needs a target without NUL bytes")
    _remove(parent, name)
    os.symlink(req.data, os.fsencode(name), dir_fd=parent)
    os.chown(name, req.uid, req.gid, dir_fd=parent, follow_symlinks=False)


def _write_chunk(parent: int, name: str, req: CopyRequest) -> bool:
    """Write one chunk into <name>.tmp; rename it into place once complete.  True when done."""
    tmp = name + ".tmp"
    if req.offset == 0:
        _remove(parent, name)  # as upstream: a new upload replaces what was there
        _remove(parent, tmp)  # and starts from a fresh temp file, never a planted one
        flags = os.O_CREAT | os.O_EXCL
    else:
        flags = os.O_CREAT  # a later chunk continues the temp file
    fd = os.open(tmp, flags | os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                 dir_fd=parent)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"CopyFile: temp file {tmp!r} of {req.path} is not a regular file")
        view, pos = memoryview(req.data), req.offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        if os.fstat(fd).st_size != req.file_size:
            return False
        # chown first: a chown clears setuid/setgid, even root's
        os.fchown(fd, req.uid, req.gid)
        os.fchmod(fd, req.file_mode & _MODE_MASK)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    return True


def copy_file(req: CopyRequest, base: str = SHARED_DIR) -> str:
    """Carry out one CopyFile request below ``base``.

    Returns what was done: "dir", "symlink", "file" (complete) or "chunk" (more to come).
    """
    names = components_below(base, req.path)
    kind = stat.S_IFMT(req.file_mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        raise InvalidArgument(f"CopyFile: {req.path}: unsupported file type {kind:#o}")
    if kind in (0, stat.S_IFREG):
        if req.file_size < 0 or req.offset < 0:
            raise InvalidArgument(f"CopyFile: {req.path}: negative size or offset")
        if req.offset + len(req.data) > req.file_size:
            raise InvalidArgument(f"CopyFile: {req.path}: chunk at {req.offset} of {len(req.data)} bytes "
                                  f"goes past file_size {req.file_size}")
    parent = _open_parent(base, names[:-1], req.dir_mode, req.path)
    name = names[-1]
    try:
        if len(names) > 1:
            os.fchown(parent, req.uid, req.gid)  # as upstream: the immediate parent is the owner's
        if kind == stat.S_IFDIR:
            _make_dir(parent, name, req)
            done = "dir"
        elif kind == stat.S_IFLNK:
            _make_symlink(parent, name, req)
            done = "symlink"
        else:
            done = "file" if _write_chunk(parent, name, req) else "chunk"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionDenied(f"CopyFile: {req.path}: refusing to follow a symlink") from None
        raise os_error(exc, f"CopyFile: {req.path}") from None
    finally:
        os.close(parent)
    if done != "chunk":
        log.debug("copied", path=req.path, kind=done, size=req.file_size)
    return done
