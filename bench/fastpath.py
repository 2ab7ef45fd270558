"""The compiled fast path against its pure-Python twins: frame codec, uevent parsing, cgroup writes.

    python -m bench.fastpath [--quick]

A table over the per-module benchmarks (bench_framing, bench_uevent and, when
the cgroup layer has it, bench_cgroupwrite): each compiled module must beat
its twin, or it does not pay for itself.  Run the modules alone for their full
output.
"""

from __future__ import annotations

import importlib

from bench.common import Row, absolute_row, cli, ratio_row


def _rows_framing(quick: bool) -> tuple[list[Row], dict]:
    from bench import bench_framing

    r = bench_framing.run(quick)
    if "compiled" not in r:
        return [absolute_row("framing: compiled vs pure", None, "ops/s", target="> 1x",
                             note=f"compiled module not loaded ({r['fast_path']})")], r
    return [
        ratio_row("framing decode (20 B frames, 64 KiB chunks)", r["compiled"]["decode_frames_per_s"],
                  r["pure"]["decode_frames_per_s"], "ops/s", baseline_name="pure twin", target="> 1x",
                  at_least=1.0),
        ratio_row("framing encode", r["compiled"]["encode_frames_per_s"], r["pure"]["encode_frames_per_s"],
                  "ops/s", baseline_name="pure twin", target="> 1x", at_least=1.0),
    ], r


def _rows_uevent(quick: bool) -> tuple[list[Row], dict]:
    from bench import bench_uevent

    r = bench_uevent.run(quick)
    if "compiled" not in r:
        return [absolute_row("uevent parse: compiled vs pure", None, "ops/s", target="> 1x",
                             note=f"compiled module not loaded ({r['fast_path']})")], r
    return [ratio_row("uevent parse", r["compiled"]["events_per_s"], r["pure"]["events_per_s"], "ops/s",
                      baseline_name="pure twin", target="> 1x", at_least=1.0)], r


def _rows_cgroupwrite(quick: bool) -> tuple[list[Row], dict]:
    try:
        mod = importlib.import_module("bench.bench_cgroupwrite")
    except ImportError as exc:
        return [absolute_row("cgroup writes: compiled vs pure", None, "ops/s", target="> 1x",
                             note=f"not available: {exc}")], {}
    r = mod.run(quick)
    rows = []
    for where in ("fake", "real"):
        d = r.get(where)
        if isinstance(d, str) or not d:
            rows.append(absolute_row(f"cgroup batch write ({where} files)", None, "ops/s", target="> 1x",
                                     note=str(d)))
            continue
        if "compiled" not in d:
            rows.append(absolute_row(f"cgroup batch write ({where} files)", None, "ops/s", target="> 1x",
                                     note="compiled module not loaded"))
            continue
        rows.append(ratio_row(f"cgroup batch write ({where} files)", d["compiled"]["write_batches_per_s"],
                              d["pure"]["write_batches_per_s"], "ops/s", baseline_name="pure twin",
                              target="> 1x", at_least=1.0))
        rows.append(ratio_row(f"cgroup batch read ({where} files)", d["compiled"]["read_batches_per_s"],
                              d["pure"]["read_batches_per_s"], "ops/s", baseline_name="pure twin",
                              target="> 1x", at_least=1.0))
    return rows, r


def run(quick: bool = False) -> dict:
    rows: list[Row] = []
    details = {}
    for name, fn in (("framing", _rows_framing), ("uevent", _rows_uevent), ("cgroupwrite", _rows_cgroupwrite)):
        got, raw = fn(quick)
        rows += got
        details[name] = raw
    return {"name": "fastpath", "rows": rows, "details": details}


if __name__ == "__main__":
    cli(run)
