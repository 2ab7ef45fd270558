"""Direct stdio streams (passfd): the agent's splice pump against raw pipe → unix-socket loops.

    python -m bench.passfd [--quick]

The same pipeline as bench.stdio's baselines — busybox ``dd bs=1M`` → pipe
(1 MiB) → middle process → unix socket → reader — with the middle process
running kagent.passfd's Pump (the splice loop the agent runs for each direct
stream, in a uvloop event loop) against a ``readv`` + ``send`` loop and a bare
``os.splice`` loop.  It measures the pump alone: CreateContainer/ExecProcess
must hand it the streams (stdin_port/stdout_port/stderr_port) for the agent to
use it end to end.  Rounds alternate; the median per-round ratio is reported.
"""

from __future__ import annotations

import os
import shutil
import statistics

from bench.common import absolute_row, busybox_rootfs, cli, ratio_row
from bench.stdio import baseline


def run(quick: bool = False) -> dict:
    made = busybox_rootfs()
    if made is None:
        return {"name": "passfd", "rows": [absolute_row("passfd stream", None, "MB/s", target="—",
                                                        note="skipped: busybox is not installed")], "details": {}}
    top, rootfs = made
    busybox = os.path.join(rootfs, "bin", "busybox")
    mib = 64 if quick else 1024
    rounds = 1 if quick else 5
    rates: dict[str, list[float]] = {"readv": [], "splice": [], "passfd": []}
    ratios: list[float] = []
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    try:
        for _ in range(rounds):
            for mode in rates:
                rate, cpu_gib = baseline(mode, mib, busybox)
                rates[mode].append(rate)
                cpu[mode].append(cpu_gib)
            ratios.append(rates["passfd"][-1] / rates["readv"][-1])
    finally:
        shutil.rmtree(top, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = statistics.median(ratios)
    row = ratio_row("direct stream stdout (passfd pump), pipe 1 MiB", med["passfd"], med["readv"], "MB/s",
                    baseline_name="readv loop", target="≥ 1.0x", at_least=1.0,
                    note=f"median of per-round ratios; CPU {cpu_med['passfd']:.2f} s/GiB (readv loop "
                         f"{cpu_med['readv']:.2f}); bare splice loop {med['splice']:,.0f} MB/s")
    row.ratio, row.met = ratio, ratio >= 1.0
    return {"name": "passfd", "rows": [row], "details": {"MB_per_s": rates, "cpu_s_per_GiB": cpu, "ratios": ratios,
                                                     "mib_per_run": mib}}


if __name__ == "__main__":
    cli(run)
