"""Kernel uevent parsing: compiled against the pure-Python twin.

    python -m bench.bench_uevent [--quick]

A hot-plug storm as the listener sees it: distinct datagrams of the kinds a guest gets
in bulk (virtio disks with MAJOR/MINOR/DEVNAME, NIC queue objects, memory blocks, NICs),
each parsed once, best of several runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from kagent import _fast
from kagent.devices import uevent


def storm(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            path = f"/devices/pci0000:00/0000:00:02.0/0000:01:{i % 32:02x}.0/virtio{i}/block/vd{i}"
            sub, extra = "block", f"MAJOR=254\0MINOR={i}\0DEVNAME=vd{i}\0DEVTYPE=disk\0DISKSEQ={i}\0"
        elif kind == 1:
            path, sub, extra = f"/devices/virtual/net/eth{i}/queues/rx-{i % 8}", "queues", ""
        elif kind == 2:
            path, sub, extra = f"/devices/system/memory/memory{i}", "memory", ""
        else:
            path = f"/devices/pci0000:00/0000:00:03.0/virtio{i}/net/eth{i}"
            sub, extra = "net", f"INTERFACE=eth{i}\0IFINDEX={i}\0"
        out.append(f"add@{path}\0ACTION=add\0DEVPATH={path}\0SUBSYSTEM={sub}\0{extra}"
                   f"SEQNUM={i + 1}\0".encode())
    return out


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False) -> dict:
    count = 10_000 if quick else 100_000
    repeat = 3 if quick else 7
    messages = storm(count)
    impls: dict[str, Callable[[bytes], Any]] = {"pure": uevent.py_parse}
    compiled = _fast.load("uevent")
    if compiled is not None:
        impls["compiled"] = compiled.parse
    result: dict[str, Any] = {
        "events": count,
        "mean_bytes": sum(map(len, messages)) / count,
        "implementation": uevent.IMPLEMENTATION,
        "fast_path": _fast.status(),
    }
    for name, parse in impls.items():
        def go(parse: Callable[[bytes], Any] = parse) -> None:
            for m in messages:
                parse(m)
        seconds = _best(go, repeat)
        result[name] = {"events_per_s": count / seconds, "us_per_event": seconds / count * 1e6}
    if "compiled" in result:
        result["ratio"] = result["compiled"]["events_per_s"] / result["pure"]["events_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and repeats")
    result = run(parser.parse_args().quick)
    print(f"uevent: {result['events']} events of {result['mean_bytes']:.0f} B on average "
          f"({result['fast_path']})")
    for name in ("pure", "compiled"):
        if name in result:
            r = result[name]
            print(f"  {name:8} {r['events_per_s']:>12,.0f} events/s  {r['us_per_event']:6.2f} µs/event")
    if "ratio" in result:
        print(f"  compiled/pure: x{result['ratio']:.1f}")
    else:
        print("  compiled module not loaded: no ratio")


if __name__ == "__main__":
    main()
