"""Batched cgroup writes and reads: compiled against the pure-Python twin.

    python -m bench.bench_cgroupwrite [--quick]

fake: a batch of 16 writes (the size of a container's resource update) to
plain files in a temp dir, and a read_batch of 24 small files (a stats call);
real: the same against real cgroup files in a ``kagent-test-bench-*`` cgroup
this benchmark makes in the v1 cpu, memory and pids hierarchies (root only;
removed afterwards).  Kernel work dominates the real case, so its ratio is the
one that says what the compiled module buys in the agent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from kagent import _fast
from kagent.cgroups import fswrite

BATCH = 16


def _best(fn: Callable[[], Any], repeat: int, inner: int) -> float:
    """Best per-call time over ``repeat`` rounds of ``inner`` calls."""
    best = float("inf")
    fn()  # warm up (the first cgroup write after idling waits for an RCU grace period)
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def _fake_tree(top: str) -> tuple[list[tuple[str, str]], list[str]]:
    writes, reads = [], []
    for i in range(BATCH):
        path = os.path.join(top, f"w{i}")
        with open(path, "w") as f:
            f.write("0\n")
        writes.append((path, str(1000 + i)))
    for i in range(24):
        path = os.path.join(top, f"r{i}")
        with open(path, "w") as f:
            f.write("key 1\n" * 20)
        reads.append(path)
    return writes, reads


def _real_tree(name: str) -> tuple[list[tuple[str, str]], list[str], list[str]] | None:
    roots = {c: f"/sys/fs/cgroup/{c}" for c in ("cpu", "memory", "pids")}
    if os.geteuid() != 0 or not all(os.path.isdir(r) for r in roots.values()):
        return None
    made = []
    for r in roots.values():
        d = os.path.join(r, name)
        os.mkdir(d)
        made.append(d)
    cpu, mem, pids = (os.path.join(roots[c], name) for c in ("cpu", "memory", "pids"))
    writes = []
    for i in range(BATCH // 4):
        writes += [(f"{cpu}/cpu.shares", str(512 + i)), (f"{cpu}/cpu.cfs_quota_us", str(50000 + i)),
                   (f"{mem}/memory.soft_limit_in_bytes", str((64 + i) << 20)), (f"{pids}/pids.max", str(100 + i))]
    reads = [f"{mem}/{n}" for n in ("memory.stat", "memory.usage_in_bytes", "memory.max_usage_in_bytes",
                                    "memory.failcnt", "memory.limit_in_bytes", "memory.use_hierarchy")]
    reads += [f"{cpu}/cpu.stat", f"{pids}/pids.current", f"{pids}/pids.max"]
    return writes, reads, made


def _measure(writes, reads, repeat: int, inner: int) -> dict[str, Any]:
    impls = {"pure": fswrite.PURE}
    if fswrite.COMPILED is not None:
        impls["compiled"] = fswrite.COMPILED
    out: dict[str, Any] = {}
    for name, mod in impls.items():
        out[name] = {
            "write_batches_per_s": 1 / _best(lambda m=mod: m.write_batch(writes), repeat, inner),
            "read_batches_per_s": 1 / _best(lambda m=mod: m.read_batch(reads), repeat, inner),
        }
    if "compiled" in out:
        out["write_ratio"] = out["compiled"]["write_batches_per_s"] / out["pure"]["write_batches_per_s"]
        out["read_ratio"] = out["compiled"]["read_batches_per_s"] / out["pure"]["read_batches_per_s"]
    return out


def run(quick: bool = False) -> dict:
    repeat = 3 if quick else 7
    inner = 200 if quick else 1000
    result: dict[str, Any] = {"batch_writes": BATCH, "fast_path": _fast.status(),
                              "implementation": fswrite.IMPLEMENTATION}
    top = tempfile.mkdtemp(prefix="kagent-bench-")
    try:
        writes, reads = _fake_tree(top)
        result["fake"] = _measure(writes, reads, repeat, inner)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    name = "kagent-test-bench-" + uuid.uuid4().hex[:8]
    made: list[str] = []
    try:
        real = _real_tree(name)
        if real is None:
            result["real"] = "skipped (needs root and the v1 cpu, memory and pids hierarchies)"
        else:
            writes, reads, made = real
            result["real"] = _measure(writes, reads, repeat, max(20, inner // 4))
    finally:
        for d in made:
            os.rmdir(d)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    result = run(parser.parse_args().quick)
    print(f"cgroupwrite: batches of {result['batch_writes']} writes ({result['fast_path']})")
    for where in ("fake", "real"):
        r = result[where]
        if isinstance(r, str):
            print(f"  {where}: {r}")
            continue
        for name in ("pure", "compiled"):
            if name in r:
                print(f"  {where:5} {name:8} write {r[name]['write_batches_per_s']:>10,.0f} batches/s   "
                      f"read {r[name]['read_batches_per_s']:>10,.0f} batches/s")
        if "write_ratio" in r:
            print(f"  {where:5} compiled/pure: write x{r['write_ratio']:.2f}, read x{r['read_ratio']:.2f}")
        else:
            print(f"  {where:5} compiled module not loaded: no ratio")


if __name__ == "__main__":
    main()
