"""GetMetrics: golden /proc files captured from this machine (tests/guest/fixtures/proc),
the families, labels and items of upstream's metrics.rs, and a live scrape."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from guest_harness import FIXTURES
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from kagent import metrics

PROC = os.path.join(FIXTURES, "proc")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KiB = 1024

FAMILIES = {  # name → (type, label names)
    "kata_agent_scrape_count": ("counter", set()),
    "kata_agent_threads": ("gauge", set()),
    "kata_agent_total_time": ("gauge", set()),
    "kata_agent_total_vm": ("gauge", set()),
    "kata_agent_total_rss": ("gauge", set()),
    "kata_agent_proc_status": ("gauge", {"item"}),
    "kata_agent_io_stat": ("gauge", {"item"}),
    "kata_agent_proc_stat": ("gauge", {"item"}),
    "kata_guest_load": ("gauge", {"item"}),
    "kata_guest_tasks": ("gauge", {"item"}),
    "kata_guest_cpu_time": ("gauge", {"cpu", "item"}),
    "kata_guest_vm_stat": ("gauge", {"item"}),
    "kata_guest_netdev_stat": ("gauge", {"interface", "item"}),
    "kata_guest_diskstat": ("gauge", {"disk", "item"}),
    "kata_guest_meminfo": ("gauge", {"item"}),
    "kata_guest_filesystem_bytes": ("gauge", {"mount", "device", "item"}),
    "kata_guest_filesystem_inodes": ("gauge", {"mount", "device", "item"}),
}


def read(name):
    with open(os.path.join(PROC, name)) as f:
        return f.read()


def parse(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(family, **match):
    """{item: value} of the samples whose labels include ``match``."""
    return {s.labels["item"]: s.value for s in family.samples
            if all(s.labels.get(k) == v for k, v in match.items())}


class FakeStatvfs:
    """A fixed statvfs for the golden scrape: the fixture's mounts are this machine's."""

    f_bsize = f_frsize = 4096
    f_blocks, f_bfree, f_bavail = 1000, 400, 300
    f_files, f_ffree, f_favail = 500, 200, 200
    calls: list[str] = []

    def __call__(self, path):
        self.calls.append(path)
        return self


# --- parsers against the golden files ------------------------------------------------------


def test_pid_stat_golden():
    assert metrics.parse_pid_stat(read("self/stat")) == {
        "utime": 4, "stime": 1, "cutime": 6, "cstime": 0, "num_threads": 1,
        "vsize": 16973824, "rss": 3355}


def test_pid_stat_with_a_hostile_comm():
    text = "42 (a) b (c d) S 1 42 42 0 -1 0 0 0 0 0 7 8 9 10 20 0 3 0 100 4096 5 0"
    st = metrics.parse_pid_stat(text)
    assert (st["utime"], st["stime"], st["cutime"], st["cstime"], st["num_threads"], st["vsize"], st["rss"]) \
        == (7, 8, 9, 10, 3, 4096, 5)


def test_loadavg_golden():
    assert metrics.parse_loadavg(read("loadavg")) == (0.87, 0.60, 0.41, 2, 122)


def test_cpu_times_golden():
    cpus = dict(metrics.parse_cpu_times(read("stat"), TICKS))
    assert list(cpus) == ["total", "0", "1"]
    assert cpus["total"]["user"] == 45539 * 1000 / TICKS
    assert cpus["1"]["steal"] == 3561 * 1000 / TICKS
    assert cpus["0"]["guest_nice"] == 0 and list(cpus["0"]) == list(metrics.CPU_ITEMS)


def test_meminfo_golden():
    mem = metrics.parse_meminfo(read("meminfo"))
    assert list(mem) == list(metrics.MEMINFO_ITEMS) and len(mem) == 58
    assert mem["mem_total"] == 24683792 * KiB
    assert mem["mem_available"] == 24198856 * KiB
    assert mem["active_anon"] == 88 * KiB
    assert mem["k_reclaimable"] == 147272 * KiB and mem["per_cpu"] == 768 * KiB
    assert mem["hugepages_total"] == 0 and mem["hugepagesize"] == 2048 * KiB  # a count, then kB
    assert mem["direct_map_1G"] == 25165824 * KiB
    assert mem["high_total"] == 0 and mem["mmap_copy"] == 0  # not in this kernel's file


def test_vmstat_golden():
    vm = metrics.parse_vmstat(read("vmstat"))
    assert len(vm) == 192 and vm["nr_free_pages"] == 958249 and vm["pgfault"] == 11009197


def test_netdev_golden():
    dev = metrics.parse_netdev(read("net/dev"))
    assert list(dev) == ["lo", "ifb0", "ifb1", "eth0"]
    eth0 = dict(zip(metrics.NETDEV_ITEMS, dev["eth0"], strict=True))
    assert eth0["recv_bytes"] == 212565247 and eth0["recv_packets"] == 5038
    assert eth0["sent_bytes"] == 273205 and eth0["sent_packets"] == 2734 and eth0["sent_compressed"] == 0


def test_diskstats_golden_and_old_kernels():
    disks = metrics.parse_diskstats(read("diskstats"))
    vda = dict(zip(metrics.DISK_ITEMS, disks["vda"], strict=True))
    assert (vda["reads"], vda["merged"], vda["sectors_read"], vda["time_reading"]) == (101223, 28375, 3862890, 57530)
    assert (vda["discards"], vda["flushes"], vda["time_flushing"]) == (13034, 222, 12)
    assert set(disks["loop0"]) == {0}
    old = metrics.parse_diskstats("   8  0 sda 1 2 3 4 5 6 7 8 9 10 11\n")  # 4.x: no discard/flush
    assert old["sda"] == list(range(1, 12)) + [0] * 6


def test_filesystems_golden_and_rules():
    assert metrics.filesystems(read("self/mountinfo")) == [("/", "vda")]  # /run/netns: same 254:0
    text = (
        "1 0 8:1 / /data rw - xfs /dev/sdb1 rw\n"
        "2 0 8:2 / /ro ro - ext4 /dev/sdb2 ro,relatime\n"
        "3 0 0:50 / /ctr/rootfs rw - overlay overlay rw,lowerdir=/a\n"
        "4 0 8:3 / /with\\040space rw - vfat /dev/sdb3 rw\n"
        "5 0 0:51 / /tmp rw - tmpfs tmpfs rw\n"
        "6 0 8:4 / /b rw shared:3 master:1 - btrfs /dev/sdc rw\n"
    )
    assert metrics.filesystems(text) == [("/data", "sdb1"), ("/ctr/rootfs", "overlay"),
                                         ("/with space", "sdb3"), ("/b", "sdc")]


# --- the whole scrape ----------------------------------------------------------------------


def test_golden_scrape_families_labels_and_values():
    fake = FakeStatvfs()
    m = metrics.AgentMetrics(proc=PROC, pid="self", statvfs=fake)
    fams = parse(m.scrape())
    assert {name: (f.type, {k for s in f.samples for k in s.labels}) for name, f in fams.items()} == FAMILIES
    one = {name: fams[name].samples[0].value for name in FAMILIES if not FAMILIES[name][1]}
    assert one == {"kata_agent_scrape_count": 1, "kata_agent_threads": 1,
                   "kata_agent_total_time": 5 / TICKS, "kata_agent_total_vm": 16973824,
                   "kata_agent_total_rss": 3355 * PAGE}
    status = values(fams["kata_agent_proc_status"])
    assert list(status) == list(metrics.PROC_STATUS_ITEMS)
    assert (status["vmpeak"], status["vmhwm"], status["nonvoluntary_ctxt_switches"]) == (16576, 13556, 12)
    assert values(fams["kata_agent_io_stat"]) == {
        "rchar": 1695443, "wchar": 11302, "syscr": 684, "syscw": 37, "read_bytes": 0,
        "write_bytes": 36864, "cancelled_write_bytes": 0}
    assert values(fams["kata_agent_proc_stat"]) == {"utime": 4, "stime": 1, "cutime": 6, "cstime": 0}
    assert values(fams["kata_guest_load"]) == {"load1": 0.87, "load5": 0.60, "load15": 0.41}
    assert values(fams["kata_guest_tasks"]) == {"cur": 2, "max": 122}
    assert {s.labels["cpu"] for s in fams["kata_guest_cpu_time"].samples} == {"total", "0", "1"}
    assert values(fams["kata_guest_cpu_time"], cpu="0")["idle"] == 121785 * 1000 / TICKS
    assert len(values(fams["kata_guest_meminfo"])) == 58
    assert values(fams["kata_guest_netdev_stat"], interface="lo")["sent_bytes"] == 3193
    assert len(values(fams["kata_guest_diskstat"], disk="vda")) == 17
    assert values(fams["kata_guest_filesystem_bytes"], mount="/", device="vda") == {
        "total": 1000 * 4096, "used": 600 * 4096, "available": 300 * 4096}
    assert values(fams["kata_guest_filesystem_inodes"], mount="/", device="vda") == {
        "total": 500, "used": 300, "available": 200}
    assert fake.calls == ["/"]


def test_upstream_text_shape():
    text = metrics.AgentMetrics(proc=PROC, statvfs=FakeStatvfs()).scrape()
    lines = text.splitlines()
    # a counter keeps its own name, as the Rust TextEncoder writes it
    assert lines[:3] == ["# HELP kata_agent_scrape_count Metrics scrape count",
                         "# TYPE kata_agent_scrape_count counter", "kata_agent_scrape_count 1.0"]
    assert "scrape_count_created" not in text and "scrape_count_total" not in text
    assert "# HELP kata_guest_tasks Guest system load." in lines  # (sic) upstream's text
    assert "# HELP kata_guest_diskstat Disks statistics in system." in lines
    assert 'kata_guest_cpu_time{cpu="total",item="user"} ' + str(45539 * 1000 / TICKS) in lines


def test_scrape_counter_counts_every_scrape():
    m = metrics.AgentMetrics(proc=PROC, statvfs=FakeStatvfs())
    counts = [parse(m.scrape())["kata_agent_scrape_count"].samples[0].value for _ in range(3)]
    assert counts == [1, 2, 3]


def test_empty_proc_gives_only_the_counter(tmp_path):
    fams = parse(metrics.AgentMetrics(proc=str(tmp_path)).scrape())
    assert list(fams) == ["kata_agent_scrape_count"]


def test_label_values_escaped():
    m = metrics.AgentMetrics(proc=PROC, statvfs=FakeStatvfs())

    class Odd:
        def collect(self):
            g = GaugeMetricFamily("kagent_test_odd", "Odd \\ labels\nhere.", labels=["item"])
            g.add_metric(['a"b\\c\nd'], 1)
            yield g

    m.register(Odd())
    fam = parse(m.scrape())["kagent_test_odd"]
    assert fam.samples[0].labels == {"item": 'a"b\\c\nd'} and fam.documentation == "Odd \\ labels\nhere."


def test_collectors_join_before_and_after_the_first_scrape():
    """The registry is made at the first scrape: a collector added before it and one added
    after both appear, after the agent's own families and in the order they were added."""
    m = metrics.AgentMetrics(proc=PROC, statvfs=FakeStatvfs())

    class One:
        def __init__(self, name):
            self.name = name

        def collect(self):
            yield GaugeMetricFamily(self.name, "A test family.", value=1)

    m.register(One("kagent_test_early"))
    assert "kagent_test_late" not in parse(m.scrape())
    m.register(One("kagent_test_late"))
    names = list(parse(m.scrape()))
    assert names[0] == "kata_agent_scrape_count"
    assert names[-2:] == ["kagent_test_early", "kagent_test_late"]


def test_live_scrape_of_this_machine():
    text = metrics.AgentMetrics().scrape()
    fams = parse(text)
    assert set(fams) == set(FAMILIES)  # / is ext4 here, so the filesystem families are present
    assert fams["kata_agent_threads"].samples[0].value >= 1
    assert values(fams["kata_agent_proc_status"])["vmrss"] > 0
    assert values(fams["kata_guest_meminfo"])["mem_total"] > 0


async def test_gather_runs_off_the_event_loop():
    m = metrics.AgentMetrics(proc=PROC, statvfs=FakeStatvfs())
    threads = []

    class Probe:
        def collect(self):
            threads.append(threading.get_ident())
            return iter(())

    m.register(Probe())
    first, second = await asyncio.gather(m.gather(), m.gather())
    assert threads and threading.get_ident() not in threads
    counts = sorted(parse(t)["kata_agent_scrape_count"].samples[0].value for t in (first, second))
    assert counts == [1, 2]


FED_BY = {  # /proc file → the families made from it
    "stat": {"kata_guest_cpu_time"}, "meminfo": {"kata_guest_meminfo"},
    "diskstats": {"kata_guest_diskstat"}, "net/dev": {"kata_guest_netdev_stat"},
    "loadavg": {"kata_guest_load", "kata_guest_tasks"}, "vmstat": {"kata_guest_vm_stat"},
    "self/stat": {"kata_agent_threads", "kata_agent_total_time", "kata_agent_total_vm",
                  "kata_agent_total_rss", "kata_agent_proc_stat"},
    "self/status": {"kata_agent_proc_status"}, "self/io": {"kata_agent_io_stat"},
    "self/mountinfo": {"kata_guest_filesystem_bytes", "kata_guest_filesystem_inodes"},
}
NAMES = tuple(FED_BY)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_file_costs_only_its_own_families(tmp_path, name, damage):
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "self").mkdir()
    for n in NAMES:
        (proc / n).write_text(read(n))
    good = set(parse(metrics.AgentMetrics(proc=str(proc), statvfs=FakeStatvfs()).scrape()))
    text = read(name)
    (proc / name).write_text(text[: len(text) // 2 - 3] if damage == "truncated" else "x) y: z\n1 2\n")
    fams = parse(metrics.AgentMetrics(proc=str(proc), statvfs=FakeStatvfs()).scrape())
    assert good == set(FAMILIES)
    assert good - set(fams) <= FED_BY[name]
