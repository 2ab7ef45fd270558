"""The sans-I/O ttRPC frame codec: bytes in, frames out, and back.

A frame is a 10-byte header (payload length uint32 BE, stream id uint32 BE,
type uint8, flags uint8) followed by the payload.  This file holds the
pure-Python twin (``PyFrameDecoder``, ``py_encode_frame``, ``py_encode_header``)
and binds the public names to the compiled ``kagent._fast.framing`` unless
``KAGENT_NO_EXTENSIONS=1`` or it failed to load (then ``kagent._fast.status()``
says so and the guard test fails).

The decoder never buffers more than the one frame it is completing: whole
frames are sliced straight out of the chunk that was fed, and only a trailing
partial frame is kept.  So feeding a large frame in many small chunks is O(n),
and no compaction is ever needed.  A frame over ``max_length`` is reported as
soon as its header is seen (payload None) and its body is discarded as it
arrives, so the stream stays in sync and the server can answer on that id.
"""

from __future__ import annotations

import struct

from kagent import _fast
from kagent.ttrpc.frame_defs import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    HEADER_SIZE,
    MESSAGE_LENGTH_MAX,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    UINT8_MAX,
    UINT32_MAX,
    FrameTooLarge,
    check_field,
    check_max_length,
)

__all__ = [
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "MESSAGE_LENGTH_MAX",
    "TYPE_DATA",
    "TYPE_REQUEST",
    "TYPE_RESPONSE",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "PyFrameDecoder",
    "encode_frame",
    "encode_header",
    "py_encode_frame",
    "py_encode_header",
]

#: (stream_id, msg_type, flags, length, payload); payload is None for an oversized frame
Frame = tuple[int, int, int, int, "bytes | None"]

_HEADER = struct.Struct(">IIBB")
_LENGTH = struct.Struct(">I")


def _bad_header(length: object, stream_id: object, msg_type: object, flags: object) -> None:
    # struct.error says little; name the field, as the compiled codec does.
    check_field("length", length, UINT32_MAX)
    check_field("stream_id", stream_id, UINT32_MAX)
    check_field("msg_type", msg_type, UINT8_MAX)
    check_field("flags", flags, UINT8_MAX)


def py_encode_header(length: int, stream_id: int, msg_type: int, flags: int) -> bytes:
    """The 10-byte header alone (e.g. to send before a spliced payload).

    ``length`` is not checked against a limit here: that is the caller's job.
    """
    try:
        return _HEADER.pack(length, stream_id, msg_type, flags)
    except struct.error:
        _bad_header(length, stream_id, msg_type, flags)
        raise


def py_encode_frame(
    stream_id: int,
    msg_type: int,
    flags: int,
    payload: bytes | bytearray | memoryview,
    max_length: int = MESSAGE_LENGTH_MAX,
) -> bytes:
    """Header and payload as one bytes object; FrameTooLarge past ``max_length``."""
    if type(payload) is bytes:
        length = len(payload)
    else:
        payload = memoryview(payload)
        length = payload.nbytes
    if length > max_length:
        raise FrameTooLarge(length, max_length)
    return py_encode_header(length, stream_id, msg_type, flags) + payload


class PyFrameDecoder:
    """Feed it bytes as they arrive; it returns the frames completed so far."""

    __slots__ = ("_max", "_pending", "_skip")

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self._max = check_max_length(max_length)
        self._pending = bytearray()  # the start of one incomplete frame, header first
        self._skip = 0  # body bytes of an oversized frame still to discard

    @property
    def max_length(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (< HEADER_SIZE + max_length)."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        pos = 0
        frames: list[Frame] = []
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
        if self._pending and pos < end:
            pos = self._complete_pending(view, pos, frames)
        unpack = _HEADER.unpack_from
        limit = self._max
        while end - pos >= HEADER_SIZE:
            length, stream_id, msg_type, flags = unpack(view, pos)
            if length > limit:
                frames.append((stream_id, msg_type, flags, length, None))
                pos += HEADER_SIZE
                drop = min(length, end - pos)
                pos += drop
                self._skip = length - drop
                continue
            start = pos + HEADER_SIZE
            if end - start < length:
                break
            pos = start + length
            frames.append((stream_id, msg_type, flags, length, bytes(view[start:pos])))
        if pos < end:
            self._pending += view[pos:]
        return frames

    def _complete_pending(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        """Move bytes from ``view`` into the pending frame; return the new position."""
        pending = self._pending
        end = len(view)
        if len(pending) < HEADER_SIZE:
            take = min(HEADER_SIZE - len(pending), end - pos)
            pending += view[pos : pos + take]
            pos += take
            if len(pending) < HEADER_SIZE:
                return pos
            length, stream_id, msg_type, flags = _HEADER.unpack_from(pending)
            if length > self._max:
                frames.append((stream_id, msg_type, flags, length, None))
                pending.clear()
                drop = min(length, end - pos)
                self._skip = length - drop
                return pos + drop
        total = HEADER_SIZE + _LENGTH.unpack_from(pending)[0]
        take = min(total - len(pending), end - pos)
        pending += view[pos : pos + take]
        pos += take
        if len(pending) == total:
            length, stream_id, msg_type, flags = _HEADER.unpack_from(pending)
            with memoryview(pending) as body:
                payload = bytes(body[HEADER_SIZE:])
            pending.clear()
            frames.append((stream_id, msg_type, flags, length, payload))
        return pos


_compiled = _fast.load("framing")

FrameDecoder: type[PyFrameDecoder] = PyFrameDecoder
encode_frame = py_encode_frame
encode_header = py_encode_header
IMPLEMENTATION = "pure"
if _compiled is not None:
    FrameDecoder = _compiled.FrameDecoder
    encode_frame = _compiled.encode_frame
    encode_header = _compiled.encode_header
    IMPLEMENTATION = "compiled"
