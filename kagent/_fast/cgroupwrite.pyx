# cython: language_level=3
"""Compiled twin of kagent/cgroups/fswrite.py: write_batch and read_batch, same errors.

Each write is open(O_WRONLY|O_CLOEXEC)/write/close with the GIL released for
the three calls; the first refused write raises CgroupWriteError (file, value,
how many succeeded).  read_batch reads each file whole (up to 1 MiB) into one
buffer, None for a missing file.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EIO, ENOENT, errno
from libc.stdlib cimport free, malloc, realloc

from kagent.cgroups.errors import CgroupWriteError


cdef extern from "<fcntl.h>":
    int c_open "open" (const char *path, int flags) nogil
    int O_WRONLY
    int O_RDONLY
    int O_CLOEXEC

cdef extern from "<unistd.h>":
    ssize_t c_write "write" (int fd, const void *buf, size_t count) nogil
    ssize_t c_read "read" (int fd, void *buf, size_t count) nogil
    int c_close "close" (int fd) nogil

cdef enum:
    READ_MAX = 1 << 20
    READ_CHUNK = 65536


cdef inline bytes _text(object value):
    if isinstance(value, bytes):
        return <bytes>value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"cgroup value must be str, int or bytes, not {type(value).__name__}")
    return str(value).encode()


def write_batch(items):
    """Write each value to its file, in order; return the number of writes."""
    cdef Py_ssize_t done = 0
    cdef bytes raw, cpath
    cdef const char *p
    cdef const char *buf
    cdef size_t n
    cdef int fd, err
    cdef ssize_t wrote
    for path, value in items:
        raw = _text(value)
        cpath = os.fsencode(path)
        p = PyBytes_AS_STRING(cpath)
        buf = PyBytes_AS_STRING(raw)
        n = <size_t>PyBytes_GET_SIZE(raw)
        err = 0
        with nogil:
            fd = c_open(p, O_WRONLY | O_CLOEXEC)
            if fd < 0:
                err = errno
            else:
                wrote = c_write(fd, buf, n)
                if wrote < 0:
                    err = errno
                elif <size_t>wrote != n:
                    err = EIO
                c_close(fd)
        if err:
            raise CgroupWriteError(err, os.fsdecode(path), raw.decode(errors="replace"), done)
        done += 1
    return done


def read_batch(paths):
    """Each file's contents (one buffer, up to 1 MiB), or None when it does not exist."""
    cdef list out = []
    cdef bytes cpath
    cdef const char *p
    cdef char *buf = <char *>malloc(READ_CHUNK)
    cdef char *grown
    cdef size_t cap = READ_CHUNK, size
    cdef ssize_t got
    cdef int fd, err
    if buf == NULL:
        raise MemoryError()
    try:
        for path in paths:
            cpath = os.fsencode(path)
            p = PyBytes_AS_STRING(cpath)
            err = 0
            size = 0
            with nogil:
                fd = c_open(p, O_RDONLY | O_CLOEXEC)
                if fd < 0:
                    err = errno
            if fd < 0:
                if err == ENOENT:
                    out.append(None)
                    continue
                raise OSError(err, os.strerror(err), os.fsdecode(path))
            while True:
                if size == cap:
                    if cap >= READ_MAX:
                        break
                    grown = <char *>realloc(buf, cap * 2)
                    if grown == NULL:
                        c_close(fd)
                        raise MemoryError()
                    buf = grown
                    cap *= 2
                with nogil:
                    got = c_read(fd, buf + size, cap - size)
                    if got < 0:
                        err = errno
                if got <= 0:
                    break
                size += <size_t>got
            c_close(fd)
            if err:
                raise OSError(err, os.strerror(err), os.fsdecode(path))
            out.append(PyBytes_FromStringAndSize(buf, size))
    finally:
        free(buf)
    return out
