# cython: language_level=3
"""Compiled twin of kagent.devices.uevent.py_parse (same API, same results).

The datagram is scanned in place with memchr: each KEY and VALUE is decoded on its
own (UTF-8, surrogateescape).  Since the separators (NUL and "=") are ASCII bytes,
which can never be part of a multi-byte sequence, decoding the pieces gives the same
strings as the twin's decode-then-split.  The keys every event carries are matched
bytewise and reuse one str object each.  Lengths come from the buffer itself, so
every pointer below stays in range; bounds checking is not switched off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp

from kagent.devices.uevent_defs import (
    LIBUDEV_MAGIC,
    MAX_MESSAGE_SIZE,
    MAX_SEQNUM_DIGITS,
    Uevent,
)

cdef Py_ssize_t _MAX_SIZE = MAX_MESSAGE_SIZE
cdef Py_ssize_t _MAX_SEQ = MAX_SEQNUM_DIGITS
cdef bytes _MAGIC = LIBUDEV_MAGIC
cdef Py_ssize_t _MAGIC_LEN = len(LIBUDEV_MAGIC)
cdef object _Uevent = Uevent
cdef object _tuple_new = tuple.__new__  # a C call: skips the namedtuple's Python __new__

cdef str K_ACTION = "ACTION"
cdef str K_DEVPATH = "DEVPATH"
cdef str K_SUBSYSTEM = "SUBSYSTEM"
cdef str K_DEVNAME = "DEVNAME"
cdef str K_SEQNUM = "SEQNUM"
cdef str K_INTERFACE = "INTERFACE"


cdef inline str _decode(const char *p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(p, n, "surrogateescape")


cdef inline str _key(const char *p, Py_ssize_t n):
    if n == 6:
        if memcmp(p, b"ACTION", 6) == 0:
            return K_ACTION
        if memcmp(p, b"SEQNUM", 6) == 0:
            return K_SEQNUM
    elif n == 7:
        if memcmp(p, b"DEVPATH", 7) == 0:
            return K_DEVPATH
        if memcmp(p, b"DEVNAME", 7) == 0:
            return K_DEVNAME
    elif n == 9:
        if memcmp(p, b"SUBSYSTEM", 9) == 0:
            return K_SUBSYSTEM
        if memcmp(p, b"INTERFACE", 9) == 0:
            return K_INTERFACE
    return _decode(p, n)


cdef object _parse(const char *p, Py_ssize_t n):
    cdef const char *end
    cdef const char *field
    cdef const char *stop
    cdef const char *eq
    cdef const char *nul
    cdef dict env
    cdef object action, devpath, seq, seqnum

    if n <= 0 or n > _MAX_SIZE:
        return None
    if n >= _MAGIC_LEN and memcmp(p, <const char *>_MAGIC, _MAGIC_LEN) == 0:
        return None
    end = p + n
    nul = <const char *>memchr(p, 0, n)
    if nul == NULL:
        nul = end
    if memchr(p, b'@', nul - p) == NULL:
        return None

    env = {}
    field = nul + 1 if nul < end else end  # never form a pointer past one-past-the-end
    while field < end:
        stop = <const char *>memchr(field, 0, end - field)
        if stop == NULL:
            stop = end
        if stop > field:
            eq = <const char *>memchr(field, b'=', stop - field)
            if eq != NULL and eq > field:
                env[_key(field, eq - field)] = _decode(eq + 1, stop - eq - 1)
        if stop == end:
            break
        field = stop + 1

    action = env.get(K_ACTION)
    devpath = env.get(K_DEVPATH)
    if not action or not devpath or (<str>devpath)[0] != "/":
        return None
    seq = env.get(K_SEQNUM)
    seqnum = None
    if seq is not None:
        if not (0 < len(<str>seq) <= _MAX_SEQ and (<str>seq).isascii() and (<str>seq).isdigit()):
            return None
        seqnum = int(seq)
    return _tuple_new(_Uevent, (
        action,
        devpath,
        env.get(K_SUBSYSTEM, ""),
        env.get(K_DEVNAME, ""),
        seqnum,
        env.get(K_INTERFACE, ""),
        env,
    ))


def parse(data):
    """Parse one netlink uevent datagram; None if it is not a well-formed kernel uevent."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _parse(<const char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
