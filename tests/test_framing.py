"""The ttRPC frame codec, run against both the pure twin and the compiled module."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kagent import _fast
from kagent.ttrpc import framing
from kagent.ttrpc.frame_defs import HEADER_SIZE, MESSAGE_LENGTH_MAX, FrameTooLarge

NO_EXTENSIONS = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"
needs_compiled = pytest.mark.skipif(NO_EXTENSIONS, reason="KAGENT_NO_EXTENSIONS=1")

PURE = SimpleNamespace(
    name="pure",
    FrameDecoder=framing.PyFrameDecoder,
    encode_frame=framing.py_encode_frame,
    encode_header=framing.py_encode_header,
)


def _compiled() -> SimpleNamespace:
    mod = _fast.load("framing")
    if mod is None:
        pytest.fail(f"compiled framing did not load: {_fast.failures().get('framing')}")
    return SimpleNamespace(
        name="compiled",
        FrameDecoder=mod.FrameDecoder,
        encode_frame=mod.encode_frame,
        encode_header=mod.encode_header,
    )


# module scope: hypothesis runs many examples per test, and the codec holds no state
@pytest.fixture(scope="module", params=["pure", pytest.param("compiled", marks=needs_compiled)])
def codec(request: pytest.FixtureRequest) -> SimpleNamespace:
    return PURE if request.param == "pure" else _compiled()


# --------------------------------------------------------------------------- helpers

SMALL_MAX = 64

frame_fields = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(1, 3) | st.integers(0, 255),
    st.integers(0, 7) | st.integers(0, 255),
    st.binary(max_size=SMALL_MAX * 2),
)


def expected(frames: list[tuple[int, int, int, bytes]], max_length: int) -> list[tuple]:
    return [(sid, t, f, len(p), p if len(p) <= max_length else None) for sid, t, f, p in frames]


def wire(codec: SimpleNamespace, frames: list[tuple[int, int, int, bytes]]) -> bytes:
    # encode with no limit: oversized frames are what the decoder must survive
    return b"".join(codec.encode_frame(sid, t, f, p, 2**32 - 1) for sid, t, f, p in frames)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def feed_all(decoder, chunks, as_type=bytes) -> list[tuple]:
    out: list[tuple] = []
    for chunk in chunks:
        out.extend(decoder.feed(as_type(chunk)))
    return out


def buffered_after(frames: list[tuple[int, int, int, bytes]], max_length: int, k: int) -> int:
    """What ``buffered`` must be after the first k bytes of the wire were fed."""
    start = 0
    for _, _, _, payload in frames:
        end = start + HEADER_SIZE + len(payload)
        if k < end:
            held = k - start
            if len(payload) > max_length and held >= HEADER_SIZE:
                return 0  # an oversized body is discarded, never held
            return held
        start = end
    return 0


# --------------------------------------------------------------------------- the guard


def test_compiled_module_loaded() -> None:
    if NO_EXTENSIONS:
        assert framing.IMPLEMENTATION == "pure"
        assert framing.FrameDecoder is framing.PyFrameDecoder
        return
    mod = _fast.load("framing")
    assert mod is not None, f"compiled framing did not load: {_fast.failures().get('framing')}"
    assert framing.IMPLEMENTATION == "compiled"
    assert framing.FrameDecoder is mod.FrameDecoder
    assert framing.encode_frame is mod.encode_frame
    assert framing.encode_header is mod.encode_header


# --------------------------------------------------------------------------- encoding


def test_constants() -> None:
    assert (framing.HEADER_SIZE, framing.MESSAGE_LENGTH_MAX) == (10, 4194304)
    assert (framing.TYPE_REQUEST, framing.TYPE_RESPONSE, framing.TYPE_DATA) == (1, 2, 3)
    assert (framing.FLAG_REMOTE_CLOSED, framing.FLAG_REMOTE_OPEN, framing.FLAG_NO_DATA) == (1, 2, 4)
    assert framing.FrameTooLarge is FrameTooLarge


def test_header_layout_big_endian(codec) -> None:
    assert codec.encode_header(0x01020304, 0x0A0B0C0D, 2, 5) == bytes.fromhex(
        "01020304 0a0b0c0d 02 05"
    )
    assert codec.encode_header(0, 0, 0, 0) == bytes(10)
    assert codec.encode_header(2**32 - 1, 2**32 - 1, 255, 255) == b"\xff" * 10


def test_encode_frame_exact_bytes(codec) -> None:
    frame = codec.encode_frame(3, framing.TYPE_REQUEST, 0, b"abc")
    assert type(frame) is bytes
    assert frame == b"\x00\x00\x00\x03\x00\x00\x00\x03\x01\x00abc"
    assert codec.encode_frame(1, framing.TYPE_DATA, framing.FLAG_NO_DATA | 1, b"") == bytes.fromhex(
        "00000000 00000001 03 05"
    )


@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_encode_accepts_bytes_like(codec, as_type) -> None:
    assert codec.encode_frame(7, 2, 0, as_type(b"xyz")) == codec.encode_header(3, 7, 2, 0) + b"xyz"


def test_encode_oversize_raises_frame_too_large(codec) -> None:
    with pytest.raises(FrameTooLarge) as info:
        codec.encode_frame(1, 2, 0, b"x" * 17, 16)
    assert isinstance(info.value, ValueError)
    assert (info.value.length, info.value.limit) == (17, 16)
    assert "17" in str(info.value) and "16" in str(info.value)
    assert codec.encode_frame(1, 2, 0, b"x" * 16, 16)[HEADER_SIZE:] == b"x" * 16


def test_encode_real_limit(codec) -> None:
    body = bytes(MESSAGE_LENGTH_MAX)
    assert len(codec.encode_frame(1, 2, 0, body)) == HEADER_SIZE + MESSAGE_LENGTH_MAX
    with pytest.raises(FrameTooLarge, match=f"{MESSAGE_LENGTH_MAX + 1}.*{MESSAGE_LENGTH_MAX}"):
        codec.encode_frame(1, 2, 0, body + b"!")


@pytest.mark.parametrize(
    "args, error, text",
    [
        ((-1, 1, 0), OverflowError, "stream_id -1"),
        ((2**32, 1, 0), OverflowError, "stream_id 4294967296"),
        ((2**80, 1, 0), OverflowError, "stream_id"),
        ((1, 256, 0), OverflowError, "msg_type 256"),
        ((1, 1, -1), OverflowError, "flags -1"),
        ((1.0, 1, 0), TypeError, "float"),
        ((1, "1", 0), TypeError, "str"),
    ],
)
def test_encode_rejects_bad_fields(codec, args, error, text) -> None:
    with pytest.raises(error, match=text):
        codec.encode_frame(*args, b"")
    with pytest.raises(error, match=text):
        codec.encode_header(0, *args)


def test_encode_rejects_bad_payload_and_length(codec) -> None:
    with pytest.raises(TypeError):
        codec.encode_frame(1, 1, 0, "text")
    with pytest.raises(OverflowError, match="length"):
        codec.encode_header(2**32, 1, 1, 0)


def test_decoder_rejects_negative_max_length(codec) -> None:
    with pytest.raises(ValueError):
        codec.FrameDecoder(-1)
    assert codec.FrameDecoder().max_length == MESSAGE_LENGTH_MAX


# --------------------------------------------------------------------------- decoding


def test_round_trip(codec) -> None:
    frames = [(1, 1, 0, b"req"), (1, 2, 0, b""), (2**32 - 1, 3, 7, bytes(range(256)))]
    decoder = codec.FrameDecoder()
    assert decoder.feed(wire(codec, frames)) == expected(frames, MESSAGE_LENGTH_MAX)
    assert decoder.buffered == 0


def test_payloads_are_bytes_on_every_path(codec) -> None:
    data = wire(codec, [(1, 1, 0, b"abcdef"), (3, 1, 0, b"")])
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))], [data[:13], data[13:]]):
        got = feed_all(codec.FrameDecoder(), chunks, bytearray)
        assert [p for *_, p in got] == [b"abcdef", b""]
        assert all(type(p) is bytes for *_, p in got)


def test_empty_feed(codec) -> None:
    decoder = codec.FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 2


def test_oversized_reported_once_then_drained(codec) -> None:
    limit = 16
    big = codec.encode_frame(5, 1, 0, bytes(range(limit + 1)), 100)
    after = codec.encode_frame(7, 1, 0, b"next", limit)
    decoder = codec.FrameDecoder(limit)
    # the header alone is enough to report it, so the server can answer stream 5 now
    assert decoder.feed(big[:HEADER_SIZE]) == [(5, 1, 0, limit + 1, None)]
    assert decoder.buffered == 0
    for i in range(HEADER_SIZE, len(big), 4):
        assert decoder.feed(big[i : i + 4]) == []
        assert decoder.buffered == 0
    assert decoder.feed(after) == [(7, 1, 0, 4, b"next")]
    assert decoder.buffered == 0


def test_oversized_header_split_and_body_shared_with_next_frame(codec) -> None:
    limit = 16
    data = codec.encode_frame(5, 1, 0, b"y" * (limit + 1), 100) + codec.encode_frame(7, 2, 0, b"ok")
    decoder = codec.FrameDecoder(limit)
    assert decoder.feed(data[:4]) == []
    assert decoder.feed(data[4:12]) == [(5, 1, 0, limit + 1, None)]
    # the rest of the oversized body and the next frame arrive together
    assert decoder.feed(data[12:]) == [(7, 2, 0, 2, b"ok")]
    assert decoder.buffered == 0


def test_exactly_max_length_accepted(codec) -> None:
    limit = 16
    data = codec.encode_frame(9, 2, 0, b"z" * limit, limit)
    want = [(9, 2, 0, limit, b"z" * limit)]
    assert codec.FrameDecoder(limit).feed(data) == want
    for cut in range(1, len(data)):  # the header split or whole, the body split
        assert feed_all(codec.FrameDecoder(limit), [data[:cut], data[cut:]]) == want


def test_zero_max_length(codec) -> None:
    data = codec.encode_frame(1, 1, 0, b"") + codec.encode_frame(3, 1, 0, b"a", 1)
    assert codec.FrameDecoder(0).feed(data) == [(1, 1, 0, 0, b""), (3, 1, 0, 1, None)]


def test_real_limit_plus_one_then_normal_frame(codec) -> None:
    decoder = codec.FrameDecoder()
    header = codec.encode_header(MESSAGE_LENGTH_MAX + 1, 11, 1, 0)
    assert decoder.feed(header) == [(11, 1, 0, MESSAGE_LENGTH_MAX + 1, None)]
    body = memoryview(bytes(MESSAGE_LENGTH_MAX + 1))
    for i in range(0, len(body), 65536):
        assert decoder.feed(body[i : i + 65536]) == []
        assert decoder.buffered == 0
    assert decoder.feed(codec.encode_frame(13, 1, 0, b"after")) == [(13, 1, 0, 5, b"after")]


def test_real_limit_frame_in_small_chunks(codec) -> None:
    # one copy per byte: a quadratic buffer would make this crawl
    payload = bytes(range(256)) * (MESSAGE_LENGTH_MAX // 256)
    data = memoryview(codec.encode_frame(15, 2, 0, payload) + codec.encode_frame(17, 2, 0, b"t"))
    decoder = codec.FrameDecoder()
    got = []
    for i in range(0, len(data), 4096):
        got.extend(decoder.feed(data[i : i + 4096]))
        assert decoder.buffered < HEADER_SIZE + MESSAGE_LENGTH_MAX
    assert got == [(15, 2, 0, MESSAGE_LENGTH_MAX, payload), (17, 2, 0, 1, b"t")]
    assert decoder.buffered == 0


# --------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(frame_fields, max_size=8),
    cuts=st.lists(st.integers(0, 2**16), max_size=20),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_property_any_split_decodes_the_same(codec, frames, cuts, as_type) -> None:
    data = wire(codec, frames)
    want = expected(frames, SMALL_MAX)
    assert codec.FrameDecoder(SMALL_MAX).feed(as_type(data)) == want
    assert feed_all(codec.FrameDecoder(SMALL_MAX), split(data, cuts), as_type) == want


@settings(max_examples=40, deadline=None)
@given(frames=st.lists(frame_fields, max_size=5))
def test_property_byte_at_a_time(codec, frames) -> None:
    data = wire(codec, frames)
    decoder = codec.FrameDecoder(SMALL_MAX)
    got = []
    for k in range(len(data)):
        got.extend(decoder.feed(data[k : k + 1]))
        assert decoder.buffered == buffered_after(frames, SMALL_MAX, k + 1)
    assert got == expected(frames, SMALL_MAX)


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(frame_fields, max_size=8), cuts=st.lists(st.integers(0, 2**16), max_size=12))
def test_property_buffered_is_exact_and_bounded(codec, frames, cuts) -> None:
    data = wire(codec, frames)
    decoder = codec.FrameDecoder(SMALL_MAX)
    fed = 0
    for chunk in split(data, cuts):
        decoder.feed(chunk)
        fed += len(chunk)
        assert decoder.buffered == buffered_after(frames, SMALL_MAX, fed)
        assert decoder.buffered < HEADER_SIZE + SMALL_MAX


# --------------------------------------------------------------------------- compiled == pure


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 2**16), max_size=20),
    max_length=st.integers(0, 80),
)
def test_differential_decode_arbitrary_bytes(data, cuts, max_length) -> None:
    compiled = _compiled()
    pure_dec, fast_dec = PURE.FrameDecoder(max_length), compiled.FrameDecoder(max_length)
    for chunk in split(data, cuts):
        assert fast_dec.feed(chunk) == pure_dec.feed(chunk)
        assert fast_dec.buffered == pure_dec.buffered


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # compare the failure exactly
        return (type(exc), str(exc))


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(
    fields=st.tuples(*[st.integers(-2, 2**33) | st.integers(-1, 300) for _ in range(3)]),
    payload=st.binary(max_size=40),
    max_length=st.integers(-1, 40),
)
def test_differential_encode(fields, payload, max_length) -> None:
    compiled = _compiled()
    assert _outcome(compiled.encode_frame, *fields, payload, max_length) == _outcome(
        PURE.encode_frame, *fields, payload, max_length
    )
    assert _outcome(compiled.encode_header, len(payload), *fields) == _outcome(
        PURE.encode_header, len(payload), *fields
    )
