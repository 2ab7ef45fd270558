"""ttRPC frame codec: compiled against the pure-Python twin.

    python -m bench.bench_framing [--quick]

Decode: many small frames (20-byte payloads) fed in 64 KiB chunks, as a busy
connection delivers them; encode: the same frames one call each; large: one
4 MiB frame fed in 4 KiB chunks (checks the decoder stays linear).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from kagent import _fast
from kagent.ttrpc import framing

CHUNK = 64 * 1024
PAYLOAD = bytes(range(20))


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _decode_small(decoder_cls: type, data: memoryview, count: int) -> Callable[[], None]:
    def go() -> None:
        decoder = decoder_cls()
        got = 0
        for i in range(0, len(data), CHUNK):
            got += len(decoder.feed(data[i : i + CHUNK]))
        assert got == count and decoder.buffered == 0

    return go


def _encode_small(encode: Callable[..., bytes], count: int) -> Callable[[], None]:
    def go() -> None:
        for sid in range(1, 2 * count, 2):
            encode(sid, framing.TYPE_RESPONSE, 0, PAYLOAD)

    return go


def _decode_large(decoder_cls: type, data: memoryview, chunk: int) -> Callable[[], None]:
    def go() -> None:
        decoder = decoder_cls()
        frames = []
        for i in range(0, len(data), chunk):
            frames.extend(decoder.feed(data[i : i + chunk]))
        assert len(frames) == 1 and frames[0][3] == framing.MESSAGE_LENGTH_MAX

    return go


def run(quick: bool = False) -> dict:
    count = 20_000 if quick else 100_000
    repeat = 2 if quick else 5
    encode = framing.py_encode_frame
    data = memoryview(
        b"".join(encode(sid, framing.TYPE_REQUEST, 0, PAYLOAD) for sid in range(1, 2 * count, 2))
    )
    large = memoryview(encode(1, framing.TYPE_REQUEST, 0, bytes(framing.MESSAGE_LENGTH_MAX)))

    impls: dict[str, tuple[type, Callable[..., bytes]]] = {
        "pure": (framing.PyFrameDecoder, framing.py_encode_frame)
    }
    compiled = _fast.load("framing")
    if compiled is not None:
        impls["compiled"] = (compiled.FrameDecoder, compiled.encode_frame)

    result: dict[str, Any] = {
        "frames": count,
        "payload_bytes": len(PAYLOAD),
        "chunk_bytes": CHUNK,
        "implementation": framing.IMPLEMENTATION,
        "fast_path": _fast.status(),
    }
    for name, (decoder_cls, encode_fn) in impls.items():
        decode_s = _best(_decode_small(decoder_cls, data, count), repeat)
        encode_s = _best(_encode_small(encode_fn, count), repeat)
        large_s = _best(_decode_large(decoder_cls, large, 4096), max(1, repeat // 2))
        result[name] = {
            "decode_frames_per_s": count / decode_s,
            "encode_frames_per_s": count / encode_s,
            "large_4k_chunks_mib_per_s": len(large) / large_s / (1 << 20),
        }
    if "compiled" in result:
        result["decode_ratio"] = (
            result["compiled"]["decode_frames_per_s"] / result["pure"]["decode_frames_per_s"]
        )
        result["encode_ratio"] = (
            result["compiled"]["encode_frames_per_s"] / result["pure"]["encode_frames_per_s"]
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    result = run(parser.parse_args().quick)
    print(
        f"framing: {result['frames']} frames of {result['payload_bytes']} B, "
        f"fed in {result['chunk_bytes'] // 1024} KiB chunks ({result['fast_path']})"
    )
    for name in ("pure", "compiled"):
        if name in result:
            r = result[name]
            print(
                f"  {name:8} decode {r['decode_frames_per_s']:>12,.0f} frames/s   "
                f"encode {r['encode_frames_per_s']:>12,.0f} frames/s   "
                f"4 MiB frame in 4 KiB chunks {r['large_4k_chunks_mib_per_s']:>8,.0f} MiB/s"
            )
    if "decode_ratio" in result:
        print(
            f"  compiled/pure: decode x{result['decode_ratio']:.1f}, "
            f"encode x{result['encode_ratio']:.1f}"
        )
    else:
        print("  compiled module not loaded: no ratio")


if __name__ == "__main__":
    main()
