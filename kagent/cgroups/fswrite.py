"""Batched cgroup file I/O: ``write_batch([(path, value), ...])`` and ``read_batch(paths)``.

Every write is one open(O_WRONLY)/write/close on an existing file: cgroup files
take one value per write(2) (one device rule, one ``maj:min rate``), and a
missing file is an error, never created.  The first refused write stops the
batch with a CgroupWriteError naming the file, the value and how many writes
had succeeded.  ``read_batch`` gives each file's bytes, or None if it does not
exist (an absent controller is normal when gathering stats).

Two twins with the same behaviour: the pure-Python functions below and the
compiled ``kagent._fast.cgroupwrite``.  The public names are bound to the
compiled one when it loads (``KAGENT_NO_EXTENSIONS=1`` selects these).
Callers write ``fswrite.write_batch(...)`` so that ``select()`` can rebind them.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable

from kagent import _fast

from .errors import CgroupWriteError

__all__ = ["write_batch", "read_batch", "CgroupWriteError"]

Value = str | int | bytes
_READ_MAX = 1 << 20  # a cgroup file larger than this is not one we parse


def _text(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"cgroup value must be str, int or bytes, not {type(value).__name__}")
    return str(value).encode()


def write_batch(items: Iterable[tuple[str | bytes, Value]]) -> int:
    """Write each value to its file, in order; return the number of writes."""
    done = 0
    for path, value in items:
        raw = _text(value)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupWriteError(exc.errno or 0, os.fsdecode(path), raw.decode(errors="replace"), done) from None
        try:
            n = os.write(fd, raw)
        except OSError as exc:
            raise CgroupWriteError(exc.errno or 0, os.fsdecode(path), raw.decode(errors="replace"), done) from None
        finally:
            os.close(fd)
        if n != len(raw):  # cgroup files take a value whole or not at all
            raise CgroupWriteError(5, os.fsdecode(path), raw.decode(errors="replace"), done)
        done += 1
    return done


def read_batch(paths: Iterable[str | bytes]) -> list[bytes | None]:
    """Each file's contents (one read of up to 1 MiB), or None when it does not exist."""
    out: list[bytes | None] = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            out.append(None)
            continue
        try:
            chunks = []
            size = 0
            while size < _READ_MAX:
                chunk = os.read(fd, min(65536, _READ_MAX - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            out.append(b"".join(chunks))
        finally:
            os.close(fd)
    return out


#: this file's functions, kept whichever twin is bound below
PURE = types.SimpleNamespace(write_batch=write_batch, read_batch=read_batch)
COMPILED = _fast.load("cgroupwrite")
IMPLEMENTATION = "pure"


def select(implementation: str) -> None:
    """Bind the public names to one twin: "compiled" or "pure" (tests use both)."""
    global IMPLEMENTATION, write_batch, read_batch
    if implementation == "compiled":
        if COMPILED is None:
            raise RuntimeError(f"the compiled cgroupwrite module is not loaded ({_fast.status()})")
        source = COMPILED
    elif implementation == "pure":
        source = PURE
    else:
        raise ValueError(f"unknown cgroupwrite implementation {implementation!r}")
    write_batch = source.write_batch
    read_batch = source.read_batch
    IMPLEMENTATION = implementation


select("compiled" if COMPILED is not None else "pure")
