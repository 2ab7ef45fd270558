"""Fuzz target: the ttRPC frame codec, both twins, against an independent model.

tests/test_framing.py already checks round trips and compiled == pure; this target
adds a third opinion (a whole-buffer model written here), streams mixing valid,
oversized and truncated frames with any max_length, any chunking, and the
encoders' refusal of every out-of-range field.
"""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest
import reliability_harness as harness
from hypothesis import given
from hypothesis import strategies as st

from kagent import _fast
from kagent.ttrpc import framing
from kagent.ttrpc.frame_defs import HEADER_SIZE, FrameTooLarge

NO_EXTENSIONS = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"


def _twins() -> list:
    twins = [pytest.param(SimpleNamespace(name="pure", Decoder=framing.PyFrameDecoder,
                                          encode_frame=framing.py_encode_frame,
                                          encode_header=framing.py_encode_header), id="pure")]
    compiled = _fast.load("framing")
    if compiled is not None:
        twins.append(pytest.param(SimpleNamespace(name="compiled", Decoder=compiled.FrameDecoder,
                                                  encode_frame=compiled.encode_frame,
                                                  encode_header=compiled.encode_header), id="compiled"))
    elif not NO_EXTENSIONS:
        twins.append(pytest.param(None, id="compiled", marks=pytest.mark.xfail(
            strict=True, reason=f"compiled framing did not load: {_fast.failures().get('framing')}")))
    return twins


TWINS = _twins()


def model(data: bytes, max_length: int) -> tuple[list[tuple], int]:
    """All frames a decoder must have returned after ``data``, and what it must still hold."""
    frames, pos, end = [], 0, len(data)
    while end - pos >= HEADER_SIZE:
        length, sid, mtype, flags = struct.unpack_from(">IIBB", data, pos)
        if length > max_length:
            frames.append((sid, mtype, flags, length, None))
            pos = min(end, pos + HEADER_SIZE + length)
            continue
        if end - pos - HEADER_SIZE < length:
            break
        frames.append((sid, mtype, flags, length, data[pos + HEADER_SIZE:pos + HEADER_SIZE + length]))
        pos += HEADER_SIZE + length
    return frames, end - pos


def header(length: int, sid: int, mtype: int, flags: int) -> bytes:
    return struct.pack(">IIBB", length, sid, mtype, flags)


u32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**31, 2**32 - 1])
u8 = st.integers(0, 255)
# one piece of a stream: a whole frame, an oversized one (header + part of its body),
# a bare header that claims a lot, or plain garbage
piece = st.one_of(
    st.builds(lambda sid, t, f, p: header(len(p), sid, t, f) + p, u32, u8, u8, st.binary(max_size=200)),
    st.builds(lambda n, sid, body: header(n, sid, 1, 0) + body, st.integers(201, 2**32 - 1), u32,
              st.binary(max_size=300)),
    st.builds(header, u32, u32, u8, u8),
    st.binary(min_size=1, max_size=40),
)
stream = st.lists(piece, max_size=12).map(b"".join)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@pytest.mark.parametrize("twin", TWINS)
@harness.fuzz_settings(300)
@given(data=stream, cuts=st.lists(st.integers(0, 2**16), max_size=24),
       max_length=st.sampled_from([0, 1, 9, 10, 64, 200, 4 << 20]) | st.integers(0, 400),
       as_type=st.sampled_from([bytes, bytearray, memoryview]))
def test_decoder_matches_the_model(twin, data, cuts, max_length, as_type):
    harness.record(f"framing.decoder[{twin.name}]")
    decoder = twin.Decoder(max_length)
    got, fed = [], 0
    for chunk in chunks(data, cuts):
        got.extend(decoder.feed(as_type(chunk)))
        fed += len(chunk)
        want, held = model(data[:fed], max_length)
        assert got == want
        assert decoder.buffered == held  # the partial frame, whole: nothing more, nothing less
        assert decoder.buffered < HEADER_SIZE + max_length + 1


@pytest.mark.parametrize("twin", TWINS)
@harness.fuzz_settings(300)
@given(length=st.integers(-2**70, 2**70) | u32, sid=st.integers(-5, 2**33) | u32,
       mtype=st.integers(-5, 300) | u8, flags=st.integers(-5, 300) | u8,
       payload=st.binary(max_size=64), max_length=st.integers(-1, 80))
def test_encoders_refuse_every_bad_field(twin, length, sid, mtype, flags, payload, max_length):
    harness.record(f"framing.encoders[{twin.name}]")
    fields_ok = 0 <= sid < 2**32 and 0 <= mtype < 256 and 0 <= flags < 256
    try:
        h = twin.encode_header(length, sid, mtype, flags)
    except (OverflowError, TypeError):
        assert not (fields_ok and 0 <= length < 2**32)
    else:
        assert fields_ok and 0 <= length < 2**32 and h == header(length, sid, mtype, flags)
    try:
        frame = twin.encode_frame(sid, mtype, flags, payload, max_length) if max_length >= 0 else None
    except FrameTooLarge:
        assert len(payload) > max_length
    except (OverflowError, TypeError):
        assert not fields_ok
    else:
        if frame is not None:
            assert fields_ok and len(payload) <= max_length
            assert twin.Decoder(max_length).feed(frame) == [(sid, mtype, flags, len(payload), payload)]
