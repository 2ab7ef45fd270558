"""Start-up: from exec to the socket accepting, and what the imports cost.

    python -m bench.startup [--quick]

Time from ``Popen`` of ``python -m kagent`` to the first accepted connection
on its unix socket (polled every 0.5 ms), median of several starts; the
interpreter's own floor (``python -c pass``, same flags) is measured alongside.
Then one start under ``python -X importtime``: the imports with the largest
cumulative time, i.e. what lazy imports could take off the path to accepting.
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import time

from bench.common import PYTHON, REPO, AgentProc, absolute_row, cli


def _python_floor(n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_importtime(text: str, top: int = 12) -> list[tuple[str, float, float]]:
    """(module, cumulative ms, self ms) of the costliest imports in ``-X importtime`` output."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((name.strip(), cum_us / 1e3, self_us / 1e3, depth))
    # The top-level imports (least indented) say what start-up pulls in and why.
    rows.sort(key=lambda r: -r[1])
    return [(n, c, s) for n, c, s, _ in rows[:top]]


def run(quick: bool = False) -> dict:
    # The guest image carries compiled bytecode (vm/build_initrd.py); measure start-up so too,
    # not the compiler (PYTHONDONTWRITEBYTECODE, often set, would leave none on disk).
    compileall.compile_dir(os.path.join(REPO, "kagent"), quiet=1)
    n = 3 if quick else 9
    ready = []
    for _ in range(n):
        agent = AgentProc()
        ready.append(agent.ready_after)
        agent.stop()
    floor = _python_floor(n)
    agent = AgentProc(env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        time.sleep(0.2)
        log = agent.log()
    finally:
        agent.stop()
    offenders = parse_importtime(log)
    ms = statistics.median(ready) * 1e3
    top = ", ".join(f"{name} {cum:.0f}" for name, cum, _ in offenders[:6])
    rows = [
        absolute_row("start-up to accepting", ms, "ms", target="≤ 150 ms", at_most=150,
                     note=f"python -c pass: {floor * 1e3:.0f} ms"),
        absolute_row("import time, costliest (cumulative ms)", offenders[0][1] if offenders else None, "ms",
                     target="(reported)", note=top),
    ]
    return {"name": "startup", "rows": rows,
            "details": {"ready_ms": [t * 1e3 for t in ready], "python_floor_ms": floor * 1e3,
                        "importtime_top": [{"module": m, "cumulative_ms": c, "self_ms": s} for m, c, s in offenders]}}


if __name__ == "__main__":
    cli(run)
