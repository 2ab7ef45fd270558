"""Resolve a path inside a container rootfs as if the rootfs were "/".

A rootfs is untrusted: an image may contain ``/etc/evil -> /`` or
``../../..`` links, and a mount destination that follows them naively would
land on the host.  ``secure_join`` walks the path one component at a time,
expanding symlinks itself and clamping ``..`` and absolute targets to the root,
so the result is always inside ``root``.  Components that do not exist yet are
kept as plain names (they will be created under the root).  This is the
``filepath-securejoin`` algorithm; it is safe while nothing inside the
container runs, which is the case during set-up.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import InvalidSpec

_MAX_LINKS = 255


def secure_join(root: str, unsafe: str) -> str:
    """The host path of ``unsafe`` (a path inside the container) under ``root``.

    A path that cannot be resolved (a name over NAME_MAX, links without end) is the spec's
    mistake: InvalidSpec naming it."""
    try:
        return _secure_join(root, unsafe)
    except OSError as exc:
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            raise
        raise InvalidSpec("path", f"path {unsafe!r}: {exc.strerror}", path=unsafe,
                          errno=exc.errno) from exc


def _secure_join(root: str, unsafe: str) -> str:
    root = root.rstrip("/") or "/"
    pending = [p for p in reversed(unsafe.split("/")) if p]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = _join(root, resolved + [part])
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise OSError(
                errno.ELOOP, f"too many levels of symbolic links in {unsafe!r} under {root!r}"
            )
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(p for p in reversed(target.split("/")) if p)
    return _join(root, resolved)


def _join(root: str, parts: list[str]) -> str:
    if not parts:
        return root
    return ("" if root == "/" else root) + "/" + "/".join(parts)


def within(root: str, path: str) -> bool:
    """Whether ``path`` is ``root`` or below it (lexically)."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def mkdir_all(root: str, unsafe: str, mode: int = 0o755) -> str:
    """Create ``unsafe`` (a directory inside the container) and return its host path."""
    path = secure_join(root, unsafe)
    os.makedirs(path, mode=mode, exist_ok=True)
    return path


def create_file(root: str, unsafe: str, mode: int = 0o755) -> str:
    """Create an empty file (a bind-mount point) inside the container, parents too."""
    path = secure_join(root, unsafe)
    parent = os.path.dirname(path)
    if within(root, parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, mode))
    return path
