"""Cgroup stats: parsers for the kernel's file formats and the CgroupStats dict.

The parsers are pure functions over file contents (golden fixtures in
tests/cgroups/fixtures).  ``v1_stats`` and ``v2_stats`` take a mapping
``file name → bytes or None`` (None: the file does not exist) and return a dict
shaped like ``agent_pb2.CgroupStats`` (same field names, nested dicts), which
``to_proto`` turns into the message.

Units as upstream: v1 cpu times in nanoseconds (cpuacct.stat's USER_HZ ticks
are converted); v2 cpu.stat's microseconds are converted to nanoseconds too,
so one unit crosses the API whatever the host's cgroup version.

Every field of CgroupStats is a uint64: a value that is not one (v1's "-1" for
unlimited, or what only an odd kernel would write, or a conversion that overflows)
reads as 0, as a missing or unparsable one does, so a stats call never fails on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "parse_flat",
    "parse_int",
    "parse_max",
    "parse_ints",
    "parse_cpuacct_stat",
    "parse_blkio",
    "parse_io_stat",
    "v1_stats",
    "v2_stats",
    "to_proto",
    "V1_FILES",
    "v2_files",
]

NANOS_PER_SECOND = 1_000_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
U64_MAX = (1 << 64) - 1

Files = Mapping[str, bytes | None]


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _u64(value: int) -> int:
    return value if 0 <= value <= U64_MAX else 0


def parse_int(data: bytes | str | None) -> int:
    """A single-value file; 0 when missing or not a number."""
    try:
        return int(_text(data).strip())
    except ValueError:
        return 0


def parse_max(data: bytes | str | None) -> int:
    """A limit that may read "max" (pids.max, memory.max): "max" and missing give 0, as upstream."""
    return parse_u64(data)


def parse_u64(data: bytes | str | None) -> int:
    """A v1 limit: "-1" style or 2**63-ish unlimited values clamp into uint64."""
    return _u64(parse_int(data))


def parse_flat(data: bytes | str | None) -> dict[str, int]:
    """Flat keyed ``key value`` lines (memory.stat, cpu.stat, memory.events, ...)."""
    out: dict[str, int] = {}
    for line in _text(data).splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = _u64(int(parts[1]))
            except ValueError:
                continue
    return out


def parse_ints(data: bytes | str | None) -> list[int]:
    """Space-separated integers (cpuacct.usage_percpu)."""
    out = []
    for word in _text(data).split():
        try:
            out.append(_u64(int(word)))
        except ValueError:
            continue
    return out


def parse_cpuacct_stat(data: bytes | str | None, ticks: int = CLOCK_TICKS) -> tuple[int, int]:
    """cpuacct.stat (USER_HZ ticks) → (user_ns, system_ns)."""
    flat = parse_flat(data)
    return (_u64(flat.get("user", 0) * NANOS_PER_SECOND // ticks),
            _u64(flat.get("system", 0) * NANOS_PER_SECOND // ticks))


def _devnum(word: str) -> tuple[int, int] | None:
    major, sep, minor = word.partition(":")
    if not sep:
        return None
    try:
        dev = int(major), int(minor)
    except ValueError:
        return None
    return dev if all(0 <= n <= U64_MAX for n in dev) else None  # no device has another number


def parse_blkio(data: bytes | str | None) -> list[dict[str, Any]]:
    """v1 blkio files: ``maj:min Op value`` lines (op lower-cased) or ``maj:min value``
    (sectors, time); the ``Total`` summary line is dropped."""
    out = []
    for line in _text(data).splitlines():
        parts = line.split()
        if not parts:
            continue
        dev = _devnum(parts[0])
        if dev is None:
            continue
        try:
            if len(parts) == 3:
                out.append({"major": dev[0], "minor": dev[1], "op": parts[1].lower(), "value": _u64(int(parts[2]))})
            elif len(parts) == 2:
                out.append({"major": dev[0], "minor": dev[1], "op": "", "value": _u64(int(parts[1]))})
        except ValueError:
            continue
    return out


_IO_STAT_OPS = (("rbytes", "read"), ("wbytes", "write"), ("rios", "rios"), ("wios", "wios"),
                ("dbytes", "dbytes"), ("dios", "dios"))


def parse_io_stat(data: bytes | str | None) -> list[dict[str, Any]]:
    """v2 io.stat (``maj:min rbytes=N wbytes=N ...``) → entries as upstream names them."""
    out = []
    for line in _text(data).splitlines():
        parts = line.split()
        if not parts:
            continue
        dev = _devnum(parts[0])
        if dev is None:
            continue
        fields = {}
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            try:
                fields[key] = _u64(int(value))
            except ValueError:
                continue
        for key, op in _IO_STAT_OPS:
            if key in fields:
                out.append({"major": dev[0], "minor": dev[1], "op": op, "value": fields[key]})
    return out


def _memory_data(files: Files, prefix: str) -> dict[str, int]:
    return {
        "usage": parse_u64(files.get(f"{prefix}usage_in_bytes")),
        "max_usage": parse_u64(files.get(f"{prefix}max_usage_in_bytes")),
        "failcnt": parse_u64(files.get(f"{prefix}failcnt")),
        "limit": parse_u64(files.get(f"{prefix}limit_in_bytes")),
    }


#: every v1 file ``v1_stats`` reads, by controller (hugetlb sizes are added by the driver)
V1_FILES: dict[str, tuple[str, ...]] = {
    "cpuacct": ("cpuacct.usage", "cpuacct.usage_percpu", "cpuacct.stat"),
    "cpu": ("cpu.stat",),
    "memory": (
        "memory.stat", "memory.use_hierarchy",
        "memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.failcnt", "memory.limit_in_bytes",
        "memory.memsw.usage_in_bytes", "memory.memsw.max_usage_in_bytes", "memory.memsw.failcnt",
        "memory.memsw.limit_in_bytes",
        "memory.kmem.usage_in_bytes", "memory.kmem.max_usage_in_bytes", "memory.kmem.failcnt",
        "memory.kmem.limit_in_bytes",
    ),
    "pids": ("pids.current", "pids.max"),
    "blkio": (
        "blkio.io_service_bytes_recursive", "blkio.io_serviced_recursive", "blkio.io_queued_recursive",
        "blkio.io_service_time_recursive", "blkio.io_wait_time_recursive", "blkio.io_merged_recursive",
        "blkio.time_recursive", "blkio.sectors_recursive",
        "blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_serviced_recursive",
    ),
}

_BLKIO_FIELDS = ("io_service_bytes_recursive", "io_serviced_recursive", "io_queued_recursive",
                 "io_service_time_recursive", "io_wait_time_recursive", "io_merged_recursive",
                 "io_time_recursive", "sectors_recursive")


def _v1_blkio(files: Files) -> dict[str, list]:
    # CFQ/BFQ files when the scheduler keeps them; otherwise the throttle
    # layer's counters, which every kernel keeps (mq-deadline here)
    if parse_blkio(files.get("blkio.io_serviced_recursive")):
        out = {f: parse_blkio(files.get(f"blkio.{f}")) for f in _BLKIO_FIELDS[:6]}
        out["io_time_recursive"] = parse_blkio(files.get("blkio.time_recursive"))
        out["sectors_recursive"] = parse_blkio(files.get("blkio.sectors_recursive"))
        return out
    return {
        "io_service_bytes_recursive": parse_blkio(files.get("blkio.throttle.io_service_bytes_recursive")),
        "io_serviced_recursive": parse_blkio(files.get("blkio.throttle.io_serviced_recursive")),
    }


def _hugetlb(files: Files, sizes: list[str], usage: str, peak: str, fail: str) -> dict[str, dict[str, int]]:
    out = {}
    for size in sizes:
        out[size] = {
            "usage": parse_u64(files.get(f"hugetlb.{size}.{usage}")),
            "max_usage": parse_u64(files.get(f"hugetlb.{size}.{peak}")) if peak else 0,
            "failcnt": parse_flat(files.get(f"hugetlb.{size}.events")).get("max", 0)
            if fail == "events" else parse_u64(files.get(f"hugetlb.{size}.{fail}")),
        }
    return out


def v1_stats(files: Files, hugepage_sizes: list[str] = (), ticks: int = CLOCK_TICKS) -> dict[str, Any]:
    """CgroupStats from v1 files (names without directories; all controllers together)."""
    user, system = parse_cpuacct_stat(files.get("cpuacct.stat"), ticks)
    throttling = parse_flat(files.get("cpu.stat"))
    mem_stat = parse_flat(files.get("memory.stat"))
    return {
        "cpu_stats": {
            "cpu_usage": {
                "total_usage": parse_u64(files.get("cpuacct.usage")),
                "percpu_usage": parse_ints(files.get("cpuacct.usage_percpu")),
                "usage_in_kernelmode": system,
                "usage_in_usermode": user,
            },
            "throttling_data": {
                "periods": throttling.get("nr_periods", 0),
                "throttled_periods": throttling.get("nr_throttled", 0),
                "throttled_time": throttling.get("throttled_time", 0),
            },
        },
        "memory_stats": {
            "cache": mem_stat.get("cache", 0),
            "usage": _memory_data(files, "memory."),
            "swap_usage": _memory_data(files, "memory.memsw."),
            "kernel_usage": _memory_data(files, "memory.kmem."),
            "use_hierarchy": parse_int(files.get("memory.use_hierarchy")) == 1,
            "stats": mem_stat,
        },
        "pids_stats": {
            "current": parse_u64(files.get("pids.current")),
            "limit": parse_max(files.get("pids.max")),
        },
        "blkio_stats": _v1_blkio(files),
        "hugetlb_stats": _hugetlb(files, list(hugepage_sizes), "usage_in_bytes", "max_usage_in_bytes", "failcnt"),
    }


def _usec_to_ns(usec: int) -> int:
    return _u64(usec * 1000)


def v2_files(hugepage_sizes: list[str] = ()) -> list[str]:
    """Every v2 file ``v2_stats`` reads."""
    names = ["cpu.stat", "memory.stat", "memory.current", "memory.peak", "memory.max", "memory.events",
             "memory.swap.current", "memory.swap.peak", "memory.swap.max", "memory.swap.events",
             "pids.current", "pids.max", "io.stat"]
    for size in hugepage_sizes:
        names += [f"hugetlb.{size}.current", f"hugetlb.{size}.max", f"hugetlb.{size}.events"]
    return names


def v2_stats(files: Files, hugepage_sizes: list[str] = ()) -> dict[str, Any]:
    """CgroupStats from v2 files (usec → ns; memory usage excludes nothing, as the kernel reports)."""
    cpu = parse_flat(files.get("cpu.stat"))
    mem_stat = parse_flat(files.get("memory.stat"))
    events = parse_flat(files.get("memory.events"))
    swap_events = parse_flat(files.get("memory.swap.events"))
    return {
        "cpu_stats": {
            "cpu_usage": {
                "total_usage": _usec_to_ns(cpu.get("usage_usec", 0)),
                "percpu_usage": [],  # v2 keeps no per-cpu usage
                "usage_in_kernelmode": _usec_to_ns(cpu.get("system_usec", 0)),
                "usage_in_usermode": _usec_to_ns(cpu.get("user_usec", 0)),
            },
            "throttling_data": {
                "periods": cpu.get("nr_periods", 0),
                "throttled_periods": cpu.get("nr_throttled", 0),
                "throttled_time": _usec_to_ns(cpu.get("throttled_usec", 0)),
            },
        },
        "memory_stats": {
            "cache": mem_stat.get("file", 0),
            "usage": {
                "usage": parse_u64(files.get("memory.current")),
                "max_usage": parse_u64(files.get("memory.peak")),
                "failcnt": events.get("max", 0),
                "limit": parse_max(files.get("memory.max")),
            },
            "swap_usage": {
                "usage": parse_u64(files.get("memory.swap.current")),
                "max_usage": parse_u64(files.get("memory.swap.peak")),
                "failcnt": swap_events.get("max", 0),
                "limit": parse_max(files.get("memory.swap.max")),
            },
            "kernel_usage": {"usage": mem_stat.get("kernel", 0), "max_usage": 0, "failcnt": 0, "limit": 0},
            "use_hierarchy": True,  # v2 is always hierarchical
            "stats": mem_stat,
        },
        "pids_stats": {
            "current": parse_u64(files.get("pids.current")),
            "limit": parse_max(files.get("pids.max")),
        },
        "blkio_stats": {"io_service_bytes_recursive": parse_io_stat(files.get("io.stat"))},
        "hugetlb_stats": _hugetlb(files, list(hugepage_sizes), "current", "", "events"),
    }


def to_proto(stats: Mapping[str, Any]):
    """The dict from ``v1_stats``/``v2_stats`` → agent_pb2.CgroupStats."""
    from kagent.protocols import agent_pb2

    fields = dict(stats)
    hugetlb = fields.pop("hugetlb_stats", None) or {}
    msg = agent_pb2.CgroupStats(**fields)
    for size, values in hugetlb.items():  # a map of messages cannot be built from dicts
        msg.hugetlb_stats[size].CopyFrom(agent_pb2.HugetlbStats(**values))
    return msg
