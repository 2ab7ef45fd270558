"""A deterministic writer of the kernel's initramfs format (cpio "newc", uncompressed).

Written here rather than run through cpio(1) so that device nodes need no mknod,
ownership is always root, every mtime is 0 and entries are in a fixed order:
the same tree always gives the same bytes (and so the same cache key).
Regular files with the same source inode are stored once, as hard links.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Node:
    """An entry that does not come from the staging tree (a device node, say)."""

    path: str  # inside the image, without the leading "/"
    mode: int  # with the file type bits
    rdev: tuple[int, int] = (0, 0)
    data: bytes = b""


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Writer:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.size += len(data)

    def _header(self, name: str, mode: int, filesize: int, nlink: int = 1,
                rdev: tuple[int, int] = (0, 0), ino: int | None = None) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev[0], rdev[1], len(raw), 0)
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + raw + _pad(len(header) + len(raw)))

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
            nlink: int = 1, ino: int | None = None) -> None:
        self._header(name, mode, len(data), nlink=nlink, rdev=rdev, ino=ino)
        if data:
            self._write(data + _pad(len(data)))

    def add_file(self, name: str, mode: int, src: str, size: int, nlink: int = 1,
                 ino: int | None = None) -> None:
        self._header(name, mode, size, nlink=nlink, ino=ino)
        with open(src, "rb") as f:
            left = size
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{src} shrank while being archived")
                self._write(chunk)
                left -= len(chunk)
        self._write(_pad(size))

    def finish(self) -> None:
        self.add(_TRAILER, 0)


def _walk(root: str) -> Iterable[str]:
    """Every path under root, relative, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            yield rel
        for name in sorted(filenames):
            yield os.path.normpath(os.path.join(rel, name))
        # os.walk does not descend into symlinked directories; they are listed in dirnames
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                yield os.path.normpath(os.path.join(rel, name))
                dirnames.remove(name)


def write_tree(root: str, out: BinaryIO, extra: Iterable[Node] = ()) -> int:
    """Archive the tree at ``root`` (as "/") plus ``extra`` nodes; returns the byte count."""
    w = Writer(out)
    # hard links: group regular files by source inode; the data goes with the last name
    links: dict[tuple[int, int], list[str]] = {}
    paths = list(_walk(root))
    for rel in paths:
        st = os.lstat(os.path.join(root, rel))
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            links.setdefault((st.st_dev, st.st_ino), []).append(rel)
    link_ino: dict[tuple[int, int], int] = {}
    for rel in paths:
        full = os.path.join(root, rel)
        st = os.lstat(full)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            w.add(rel, stat.S_IFDIR | perm, nlink=2)
        elif stat.S_ISLNK(st.st_mode):
            w.add(rel, stat.S_IFLNK | 0o777, os.readlink(full).encode())
        elif stat.S_ISREG(st.st_mode):
            group = links.get((st.st_dev, st.st_ino))
            if group is None or len(group) == 1:
                w.add_file(rel, stat.S_IFREG | perm, full, st.st_size)
                continue
            key = (st.st_dev, st.st_ino)
            if key not in link_ino:
                w._ino += 1
                link_ino[key] = w._ino
            if rel == group[-1]:
                w.add_file(rel, stat.S_IFREG | perm, full, st.st_size, nlink=len(group), ino=link_ino[key])
            else:
                w.add(rel, stat.S_IFREG | perm, nlink=len(group), ino=link_ino[key])
        else:
            raise ValueError(f"{full}: cannot archive this file type ({stat.filemode(st.st_mode)})")
    for node in extra:
        w.add(node.path.lstrip("/"), node.mode, node.data, rdev=node.rdev)
    w.finish()
    return w.size
