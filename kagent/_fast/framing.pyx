# cython: language_level=3
"""Compiled twin of kagent.ttrpc.framing (same API, same errors, same results).

Lengths are checked at the frame boundary, so every memcpy below is in range;
bounds checking is not switched off anywhere.  An incomplete frame's payload is
written straight into a preallocated bytes object, so a large frame costs one
copy however it is chunked.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from kagent.ttrpc.frame_defs import (
    MESSAGE_LENGTH_MAX,
    FrameTooLarge,
    check_field,
    check_max_length,
)


cdef extern from "Python.h":
    bint PyLong_Check(object o)
    bint PyLong_CheckExact(object o)
    # Reports overflow through *overflow instead of raising, so we can name the field.
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1


cdef enum:
    HEADER = 10
    U8_MAX = 0xFF

cdef uint32_t U32_MAX = 0xFFFFFFFF


cdef inline uint32_t _get_be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put_header(unsigned char *p, uint32_t length, uint32_t stream_id,
                             unsigned char msg_type, unsigned char flags) noexcept nogil:
    p[0] = length >> 24
    p[1] = (length >> 16) & 0xFF
    p[2] = (length >> 8) & 0xFF
    p[3] = length & 0xFF
    p[4] = stream_id >> 24
    p[5] = (stream_id >> 16) & 0xFF
    p[6] = (stream_id >> 8) & 0xFF
    p[7] = stream_id & 0xFF
    p[8] = msg_type
    p[9] = flags


cdef inline long long _field(object value, str name, long long limit) except -1:
    """``value`` as a C integer in 0..limit; otherwise the twin's exact error."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_Check(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= v <= limit:
            return v
    return check_field(name, value, limit)  # raises, or accepts an __index__ type


def encode_header(length, stream_id, msg_type, flags):
    """The 10-byte header alone; ``length`` is not checked against a limit."""
    cdef long long n = _field(length, "length", U32_MAX)
    cdef long long sid = _field(stream_id, "stream_id", U32_MAX)
    cdef long long t = _field(msg_type, "msg_type", U8_MAX)
    cdef long long f = _field(flags, "flags", U8_MAX)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER)
    _put_header(<unsigned char *>PyBytes_AS_STRING(out), <uint32_t>n, <uint32_t>sid,
                <unsigned char>t, <unsigned char>f)
    return out


def encode_frame(stream_id, msg_type, flags, payload, max_length=MESSAGE_LENGTH_MAX):
    """Header and payload as one bytes object; FrameTooLarge past ``max_length``."""
    cdef Py_buffer view
    if PyBytes_CheckExact(payload):
        return _encode(stream_id, msg_type, flags, PyBytes_AS_STRING(payload),
                       PyBytes_GET_SIZE(payload), max_length)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        return _encode(stream_id, msg_type, flags, <const char *>view.buf, view.len, max_length)
    finally:
        PyBuffer_Release(&view)


cdef inline bint _too_large(Py_ssize_t length, object max_length) except -1:
    cdef int overflow = 0
    cdef long long limit
    if PyLong_CheckExact(max_length):
        limit = PyLong_AsLongLongAndOverflow(max_length, &overflow)
        if overflow == 0:
            return length > limit
        return overflow < 0
    return length > max_length


cdef bytes _encode(object stream_id, object msg_type, object flags, const char *src,
                   Py_ssize_t length, object max_length):
    if _too_large(length, max_length):
        raise FrameTooLarge(length, max_length)
    if <unsigned long long>length > U32_MAX:
        check_field("length", length, U32_MAX)
    cdef long long sid = _field(stream_id, "stream_id", U32_MAX)
    cdef long long t = _field(msg_type, "msg_type", U8_MAX)
    cdef long long f = _field(flags, "flags", U8_MAX)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER + length)
    cdef unsigned char *o = <unsigned char *>PyBytes_AS_STRING(out)
    _put_header(o, <uint32_t>length, <uint32_t>sid, <unsigned char>t, <unsigned char>f)
    if length:
        memcpy(o + HEADER, src, length)
    return out


cdef class FrameDecoder:
    """Feed it bytes as they arrive; it returns the frames completed so far."""

    cdef uint64_t _max
    cdef object _max_length
    # the incomplete frame: its header (possibly partial), then its payload,
    # allocated at full size once the header is known and filled as bytes arrive
    cdef unsigned char _head[HEADER]
    cdef Py_ssize_t _head_len
    cdef object _body
    cdef Py_ssize_t _body_len
    cdef uint64_t _skip  # body bytes of an oversized frame still to discard

    def __cinit__(self):
        self._max = MESSAGE_LENGTH_MAX
        self._max_length = MESSAGE_LENGTH_MAX
        self._body = None

    def __init__(self, max_length=MESSAGE_LENGTH_MAX):
        max_length = check_max_length(max_length)
        self._max_length = max_length
        self._max = min(max_length, U32_MAX)  # no uint32 length can exceed more

    @property
    def max_length(self):
        return self._max_length

    @property
    def buffered(self):
        """Bytes held for an incomplete frame (< HEADER_SIZE + max_length)."""
        return self._head_len + self._body_len

    def feed(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._feed(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef list _feed(self, const unsigned char *p, Py_ssize_t end):
        cdef list frames = []
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t start
        cdef uint64_t drop
        cdef uint32_t length
        if self._skip:
            drop = min(self._skip, <uint64_t>end)
            self._skip -= drop
            pos = <Py_ssize_t>drop
        if self._head_len and pos < end:
            pos = self._complete_pending(p, pos, end, frames)
        while end - pos >= HEADER:
            length = _get_be32(p + pos)
            if length > self._max:
                frames.append((_get_be32(p + pos + 4), p[pos + 8], p[pos + 9], length, None))
                pos += HEADER
                drop = min(<uint64_t>length, <uint64_t>(end - pos))
                pos += <Py_ssize_t>drop
                self._skip = length - drop
                continue
            start = pos + HEADER
            if <uint64_t>(end - start) < length:
                break
            frames.append((_get_be32(p + pos + 4), p[pos + 8], p[pos + 9], length,
                           PyBytes_FromStringAndSize(<const char *>(p + start), length)))
            pos = start + length
        if pos < end:
            # a partial frame remains: it is shorter than header + its length,
            # and its length is within the limit (else the loop consumed it)
            start = min(<Py_ssize_t>HEADER, end - pos)
            memcpy(self._head, p + pos, start)
            self._head_len = start
            pos += start
            if start == HEADER:
                length = _get_be32(self._head)
                self._body = PyBytes_FromStringAndSize(NULL, length)
                memcpy(PyBytes_AS_STRING(self._body), p + pos, end - pos)
                self._body_len = end - pos
        return frames

    cdef Py_ssize_t _complete_pending(self, const unsigned char *p, Py_ssize_t pos,
                                      Py_ssize_t end, list frames) except -1:
        cdef Py_ssize_t take
        cdef uint64_t drop
        cdef uint32_t length
        if self._head_len < HEADER:
            take = min(HEADER - self._head_len, end - pos)
            memcpy(self._head + self._head_len, p + pos, take)
            self._head_len += take
            pos += take
            if self._head_len < HEADER:
                return pos
            length = _get_be32(self._head)
            if length > self._max:
                frames.append(self._header_tuple(length, None))
                self._head_len = 0
                drop = min(<uint64_t>length, <uint64_t>(end - pos))
                self._skip = length - drop
                return pos + <Py_ssize_t>drop
            if length == 0:
                frames.append(self._header_tuple(0, b""))
                self._head_len = 0
                return pos
            self._body = PyBytes_FromStringAndSize(NULL, length)
            self._body_len = 0
        length = _get_be32(self._head)
        take = min(<Py_ssize_t>length - self._body_len, end - pos)
        memcpy(PyBytes_AS_STRING(self._body) + self._body_len, p + pos, take)
        self._body_len += take
        pos += take
        if self._body_len == <Py_ssize_t>length:
            frames.append(self._header_tuple(length, self._body))
            self._body = None
            self._body_len = 0
            self._head_len = 0
        return pos

    cdef tuple _header_tuple(self, uint32_t length, object payload):
        return (_get_be32(self._head + 4), self._head[8], self._head[9], length, payload)
