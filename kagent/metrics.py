"""GetMetrics: the upstream agent's Prometheus families, read from /proc at each scrape.

A private registry holds the scrape counter and two collectors: the agent process
(``kata_agent_*`` from /proc/<pid>) and the guest (``kata_guest_*`` from /proc and
statvfs of the mounted filesystems).  The collectors read fresh values at every
scrape, so a vanished interface, disk or mount vanishes from the output too.

The text is encoded as upstream's (Rust prometheus TextEncoder) is: a counter keeps
its own name (``kata_agent_scrape_count 3``, no ``_total`` and no ``_created``), so
the host sees the same family names from kagent as from the Rust agent.  Other
parts add their collectors with ``AgentMetrics.register``.

prometheus-client is imported by what runs at scrape time (the registry is built at the
first scrape, the families made in ``collect``), never at start-up: importing it costs
about as much as the rest of the agent's start-up imports.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kagent.log import get_logger
from kagent.runtime import mountinfo

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

log = get_logger("metrics")

PROC_STATUS_ITEMS = {  # label → /proc/<pid>/status key (kB values are kept in kB, as upstream)
    "vmpeak": "VmPeak", "vmsize": "VmSize", "vmlck": "VmLck", "vmpin": "VmPin", "vmhwm": "VmHWM",
    "vmrss": "VmRSS", "rssanon": "RssAnon", "rssfile": "RssFile", "rssshmem": "RssShmem",
    "vmdata": "VmData", "vmstk": "VmStk", "vmexe": "VmExe", "vmlib": "VmLib", "vmpte": "VmPTE",
    "vmswap": "VmSwap", "hugetlbpages": "HugetlbPages",
    "voluntary_ctxt_switches": "voluntary_ctxt_switches",
    "nonvoluntary_ctxt_switches": "nonvoluntary_ctxt_switches",
}
IO_ITEMS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes", "cancelled_write_bytes")
CPU_ITEMS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
NETDEV_ITEMS = tuple(f"recv_{k}" for k in ("bytes", "packets", "errs", "drop", "fifo", "frame",
                                           "compressed", "multicast")) + \
    tuple(f"sent_{k}" for k in ("bytes", "packets", "errs", "drop", "fifo", "colls", "carrier", "compressed"))
DISK_ITEMS = ("reads", "merged", "sectors_read", "time_reading", "writes", "writes_merged",
              "sectors_written", "time_writing", "in_progress", "time_in_progress",
              "weighted_time_in_progress", "discards", "discards_merged", "sectors_discarded",
              "time_discarding", "flushes", "time_flushing")
MEMINFO_ITEMS = {  # label → /proc/meminfo key; "kB" values become bytes (the procfs crate's unit)
    "mem_total": "MemTotal", "mem_free": "MemFree", "mem_available": "MemAvailable",
    "buffers": "Buffers", "cached": "Cached", "swap_cached": "SwapCached", "active": "Active",
    "inactive": "Inactive", "active_anon": "Active(anon)", "inactive_anon": "Inactive(anon)",
    "active_file": "Active(file)", "inactive_file": "Inactive(file)", "unevictable": "Unevictable",
    "mlocked": "Mlocked", "high_total": "HighTotal", "high_free": "HighFree", "low_total": "LowTotal",
    "low_free": "LowFree", "mmap_copy": "MmapCopy", "swap_total": "SwapTotal", "swap_free": "SwapFree",
    "dirty": "Dirty", "writeback": "Writeback", "anon_pages": "AnonPages", "mapped": "Mapped",
    "shmem": "Shmem", "slab": "Slab", "s_reclaimable": "SReclaimable", "s_unreclaim": "SUnreclaim",
    "kernel_stack": "KernelStack", "page_tables": "PageTables", "quicklists": "Quicklists",
    "nfs_unstable": "NFS_Unstable", "bounce": "Bounce", "writeback_tmp": "WritebackTmp",
    "commit_limit": "CommitLimit", "committed_as": "Committed_AS", "vmalloc_total": "VmallocTotal",
    "vmalloc_used": "VmallocUsed", "vmalloc_chunk": "VmallocChunk",
    "hardware_corrupted": "HardwareCorrupted", "anon_hugepages": "AnonHugePages",
    "shmem_hugepages": "ShmemHugePages", "shmem_pmd_mapped": "ShmemPmdMapped", "cma_total": "CmaTotal",
    "cma_free": "CmaFree", "hugepages_total": "HugePages_Total", "hugepages_free": "HugePages_Free",
    "hugepages_rsvd": "HugePages_Rsvd", "hugepages_surp": "HugePages_Surp",
    "hugepagesize": "Hugepagesize", "direct_map_4k": "DirectMap4k", "direct_map_4M": "DirectMap4M",
    "direct_map_2M": "DirectMap2M", "direct_map_1G": "DirectMap1G", "hugetlb": "Hugetlb",
    "per_cpu": "Percpu", "k_reclaimable": "KReclaimable",
}
FS_TYPES = frozenset({"ext4", "xfs", "btrfs", "vfat", "overlay"})


# --- /proc parsers (text in, numbers out; golden-tested) ---------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, newline="") as f:  # as written: a "\r" in a mount point is not a line end
            return f.read()
    except OSError as exc:
        log.debug("cannot read", path=path, error=str(exc))
        return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def parse_pid_stat(text: str) -> dict[str, int]:
    """/proc/<pid>/stat → the fields upstream uses (comm may hold spaces and parentheses)."""
    rest = text[text.rindex(")") + 2:].split()

    def field(n: int) -> int:  # n: the 1-based field number of proc(5)
        return _int(rest[n - 3]) if len(rest) > n - 3 else 0

    return {"utime": field(14), "stime": field(15), "cutime": field(16), "cstime": field(17),
            "num_threads": field(20), "vsize": field(23), "rss": field(24)}


def parse_colon_table(text: str) -> dict[str, tuple[int, str]]:
    """``Key:  value [unit]`` lines (status, io, meminfo) → {key: (value, unit)}."""
    out: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        words = value.split()
        if sep and words:
            out[key.strip()] = (_int(words[0]), words[1] if len(words) > 1 else "")
    return out


def parse_loadavg(text: str) -> tuple[float, float, float, int, int]:
    """/proc/loadavg → (load1, load5, load15, runnable tasks, all tasks)."""
    words = text.split()
    cur, _, total = words[3].partition("/")
    return float(words[0]), float(words[1]), float(words[2]), _int(cur), _int(total)


def parse_cpu_times(text: str, ticks: int) -> list[tuple[str, dict[str, float]]]:
    """/proc/stat cpu lines → [("total" | "<n>", {item: milliseconds})].

    The label is the CPU's own number (upstream counts lines, which differs once a CPU is
    offline).
    """
    out = []
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        words = line.split()
        label = "total" if words[0] == "cpu" else words[0][3:]
        values = [_int(w) for w in words[1:]] + [0] * len(CPU_ITEMS)
        out.append((label, {item: values[i] * 1000 / ticks for i, item in enumerate(CPU_ITEMS)}))
    return out


def parse_vmstat(text: str) -> dict[str, int]:
    return {w[0]: _int(w[1]) for w in (line.split() for line in text.splitlines()) if len(w) == 2}


def parse_netdev(text: str) -> dict[str, list[int]]:
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if sep:
            values = [_int(w) for w in rest.split()] + [0] * len(NETDEV_ITEMS)
            out[name.strip()] = values[: len(NETDEV_ITEMS)]
    return out


def parse_diskstats(text: str) -> dict[str, list[int]]:
    """Older kernels have fewer columns (no discard/flush): the missing ones are 0."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 + 11:
            values = [_int(w) for w in words[3:]] + [0] * len(DISK_ITEMS)
            out[words[2]] = values[: len(DISK_ITEMS)]
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    table = parse_colon_table(text)
    out = {}
    for label, key in MEMINFO_ITEMS.items():
        value, unit = table.get(key, (0, ""))
        out[label] = value * 1024 if unit == "kB" else value
    return out


def filesystems(mountinfo_text: str) -> list[tuple[str, str]]:
    """[(mount point, device)] worth reporting: ext4/xfs/btrfs/vfat/overlay, read-write
    superblocks, one mount per device (maj:min)."""
    seen: set[str] = set()
    out = []
    for m in mountinfo.parse(mountinfo_text):
        if m.fstype not in FS_TYPES or "ro" in m.super_options.split(",") or m.devno in seen:
            continue
        seen.add(m.devno)
        out.append((m.mount_point, os.path.basename(m.source)))
    return out


# --- collectors --------------------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, labels=labels)


class ProcessCollector:
    """kata_agent_*: the agent process itself."""

    def __init__(self, proc: str = "/proc", pid: int | str = "self") -> None:
        self.base = os.path.join(proc, str(pid))
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        yield from _guarded(self._stat, self._status, self._io)

    def _stat(self) -> Iterator[Metric]:
        text = _read(os.path.join(self.base, "stat"))
        if not text:
            return
        st = parse_pid_stat(text)
        yield _one("kata_agent_threads", "Agent process threads", st["num_threads"])
        yield _one("kata_agent_total_time", "Agent process total time",
                   (st["utime"] + st["stime"]) / self.ticks)
        yield _one("kata_agent_total_vm", "Agent process total VM size", st["vsize"])
        yield _one("kata_agent_total_rss", "Agent process total RSS size", st["rss"] * self.page)
        g = _gauge("kata_agent_proc_stat", "Agent process statistics.", ["item"])
        for item in ("utime", "stime", "cutime", "cstime"):
            g.add_metric([item], st[item])
        yield g

    def _status(self) -> Iterator[Metric]:
        text = _read(os.path.join(self.base, "status"))
        if text:
            table = parse_colon_table(text)
            g = _gauge("kata_agent_proc_status", "Agent process status.", ["item"])
            for label, key in PROC_STATUS_ITEMS.items():
                g.add_metric([label], table.get(key, (0, ""))[0])
            yield g

    def _io(self) -> Iterator[Metric]:
        text = _read(os.path.join(self.base, "io"))  # absent without CONFIG_TASK_IO_ACCOUNTING
        if text:
            table = parse_colon_table(text)
            g = _gauge("kata_agent_io_stat", "Agent process IO statistics.", ["item"])
            for item in IO_ITEMS:
                g.add_metric([item], table.get(item, (0, ""))[0])
            yield g


def _guarded(*sections: Callable[[], Iterator[Metric]]) -> Iterator[Metric]:
    """Each section whole or not at all: a file the parser cannot make sense of costs its
    own families, never the scrape."""
    for section in sections:
        try:
            families = list(section())
        except (ValueError, IndexError) as exc:
            log.warning("unparsable metrics source", section=section.__name__.lstrip("_"), error=str(exc))
            continue
        yield from families


def _one(name: str, doc: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


class GuestCollector:
    """kata_guest_*: the guest system, from /proc and statvfs."""

    def __init__(self, proc: str = "/proc", mountinfo: str | None = None,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.proc = proc
        self.mountinfo = mountinfo or os.path.join(proc, "self/mountinfo")
        self.statvfs = statvfs
        self.ticks = os.sysconf("SC_CLK_TCK")

    def _text(self, name: str) -> str | None:
        return _read(os.path.join(self.proc, name))

    def collect(self) -> Iterator[Metric]:
        yield from _guarded(self._load, self._cpu, self._vmstat, self._netdev, self._disks,
                            self._meminfo, self._filesystems)

    def _load(self) -> Iterator[Metric]:
        text = self._text("loadavg")
        if text:
            l1, l5, l15, cur, total = parse_loadavg(text)
            g = _gauge("kata_guest_load", "Guest system load.", ["item"])
            for item, v in (("load1", l1), ("load5", l5), ("load15", l15)):
                g.add_metric([item], v)
            yield g
            g = _gauge("kata_guest_tasks", "Guest system load.", ["item"])  # (sic) upstream's text
            g.add_metric(["cur"], cur)
            g.add_metric(["max"], total)
            yield g

    def _cpu(self) -> Iterator[Metric]:
        text = self._text("stat")
        if text:
            g = _gauge("kata_guest_cpu_time", "Guest CPU statistics.", ["cpu", "item"])
            for cpu, times in parse_cpu_times(text, self.ticks):
                for item, v in times.items():
                    g.add_metric([cpu, item], v)
            yield g

    def _vmstat(self) -> Iterator[Metric]:
        text = self._text("vmstat")
        if text:
            g = _gauge("kata_guest_vm_stat", "Guest virtual memory statistics.", ["item"])
            for item, v in parse_vmstat(text).items():
                g.add_metric([item], v)
            yield g

    def _netdev(self) -> Iterator[Metric]:
        return self._tables("net/dev", parse_netdev, NETDEV_ITEMS, "kata_guest_netdev_stat",
                            "Guest net devices statistics.", "interface")

    def _disks(self) -> Iterator[Metric]:
        return self._tables("diskstats", parse_diskstats, DISK_ITEMS, "kata_guest_diskstat",
                            "Disks statistics in system.", "disk")

    def _meminfo(self) -> Iterator[Metric]:
        text = self._text("meminfo")
        if text:
            g = _gauge("kata_guest_meminfo", "Statistics about memory usage in the system.", ["item"])
            for item, v in parse_meminfo(text).items():
                g.add_metric([item], v)
            yield g

    def _tables(self, name: str, parse: Callable[[str], dict[str, list[int]]], items: tuple[str, ...],
                family: str, doc: str, label: str) -> Iterator[Metric]:
        text = self._text(name)
        if not text:
            return
        g = _gauge(family, doc, [label, "item"])
        for key, values in parse(text).items():
            for item, v in zip(items, values, strict=True):
                g.add_metric([key, item], v)
        yield g

    def _filesystems(self) -> Iterator[Metric]:
        text = _read(self.mountinfo)
        if not text:
            return
        space = _gauge("kata_guest_filesystem_bytes", "Guest filesystem space usage in bytes.",
                       ["mount", "device", "item"])
        inodes = _gauge("kata_guest_filesystem_inodes", "Guest filesystem inode usage.",
                        ["mount", "device", "item"])
        for mount, device in filesystems(text):
            try:
                st = self.statvfs(mount)
            except OSError as exc:
                log.debug("statvfs failed", mount=mount, error=str(exc))
                continue
            size = st.f_frsize or st.f_bsize
            for g, total, free, avail in (
                (space, st.f_blocks * size, st.f_bfree * size, st.f_bavail * size),
                (inodes, st.f_files, st.f_ffree, st.f_ffree),
            ):
                g.add_metric([mount, device, "total"], total)
                g.add_metric([mount, device, "used"], total - free)
                g.add_metric([mount, device, "available"], avail)
        yield space
        yield inodes


# --- the registry and its encoding -------------------------------------------------------------


def created_series() -> bool:
    """Whether counters and histograms carry ``_created`` samples, for the families kagent
    keeps as plain numbers: prometheus-client's own switch, PROMETHEUS_DISABLE_CREATED_SERIES."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class _ScrapeCounter:
    """kata_agent_scrape_count, from ``AgentMetrics.scrapes``."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily

        created = self.metrics.created if created_series() else None
        yield CounterMetricFamily("kata_agent_scrape_count", "Metrics scrape count",
                                  value=self.metrics.scrapes, created=created)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def encode(registry: CollectorRegistry) -> str:
    """Prometheus text format 0.0.4 with upstream's counter naming; empty families omitted."""
    from prometheus_client.utils import floatToGoString

    out: list[str] = []
    for family in registry.collect():
        if not family.samples:
            continue
        kind = {"unknown": "untyped", "info": "gauge", "stateset": "gauge"}.get(family.type, family.type)
        doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {family.name} {doc}\n# TYPE {family.name} {kind}\n")
        for s in family.samples:
            name = s.name
            if name.endswith("_created") and family.type in ("counter", "histogram", "summary"):
                continue  # prometheus-client's creation times: upstream has none
            if family.type == "counter":
                if name == family.name + "_total":
                    name = family.name
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                       else f"{name} {floatToGoString(s.value)}\n")
    return "".join(out)


class AgentMetrics:
    """The private registry behind GetMetrics and the HTTP endpoint, made at the first scrape."""

    def __init__(self, proc: str = "/proc", pid: int | str = "self", mountinfo: str | None = None,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.scrapes = 0  # GetMetrics calls (kata_agent_scrape_count)
        self.created = time.time()  # the counter's _created: counting starts with the agent
        self._collectors: list[Any] = [_ScrapeCounter(self), ProcessCollector(proc, pid),
                                       GuestCollector(proc, mountinfo, statvfs)]
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()  # scrapes run in threads: one registry
        self._lock = threading.Lock()  # one scrape at a time: collectors read many files

    def register(self, collector: Any) -> None:
        """Add a collector (an object with ``collect()``); the families keep this order."""
        with self._registry_lock:
            if self._registry is None:
                self._collectors.append(collector)
            else:
                self._registry.register(collector)

    @property
    def registry(self) -> CollectorRegistry:
        """prometheus-client's registry, made at first use with every collector added so far."""
        if self._registry is None:
            with self._registry_lock:
                if self._registry is None:
                    from prometheus_client import CollectorRegistry

                    registry = CollectorRegistry(auto_describe=False)
                    for collector in self._collectors:
                        registry.register(collector)
                    self._collectors = []
                    self._registry = registry
        return self._registry

    def scrape(self) -> str:
        registry = self.registry
        with self._lock:
            self.scrapes += 1
            return encode(registry)

    async def gather(self) -> str:
        """A scrape off the event loop (it reads dozens of /proc files and statfs's mounts; the
        first one also imports prometheus-client)."""
        return await asyncio.to_thread(self.scrape)
