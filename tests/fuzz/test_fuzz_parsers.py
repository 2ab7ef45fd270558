"""Fuzz targets: what the kernel (and containers, through their cgroups) write and the
agent parses — cgroup stats files, /proc files for metrics, mountinfo, uevents.

Properties: no parser raises on any content; what the agent builds from them is
a valid protobuf (stats) or a valid Prometheus text (metrics); the uevent twins
agree and the device registry takes any event.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import reliability_harness as harness
from hypothesis import given
from hypothesis import strategies as st

from kagent import _fast
from kagent.cgroups import stats
from kagent.devices import uevent
from kagent.devices.registry import DeviceRegistry
from kagent.metrics import AgentMetrics, filesystems
from kagent.runtime import mountinfo

NO_EXTENSIONS = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"

# --- cgroup stats -----------------------------------------------------------------------------

numbers = st.one_of(st.integers(-2**70, 2**70).map(str), st.sampled_from(
    ["0", "-1", "max", "18446744073709551615", "18446744073709551616", "9223372036854775807",
     "1e9", "0x10", " 42 ", "", "nan", "+5", "٣"]))
words = st.sampled_from(["cache", "rss", "file", "anon", "user", "system", "usage_usec", "user_usec",
                         "system_usec", "nr_periods", "nr_throttled", "throttled_usec", "throttled_time",
                         "max", "oom", "oom_kill", "kernel", "total_cache", "Total", "Read", "Write",
                         "rbytes", "wbytes", "rios", "wios", "dbytes", "dios"]) | st.text(max_size=8)
devnum = st.builds(lambda a, b: f"{a}:{b}", numbers, numbers) | st.text(max_size=6)
line = st.one_of(
    st.builds(lambda k, v: f"{k} {v}", words, numbers),
    st.builds(lambda d, o, v: f"{d} {o} {v}", devnum, words, numbers),
    st.builds(lambda d, kvs: d + " " + " ".join(f"{k}={v}" for k, v in kvs), devnum,
              st.lists(st.tuples(words, numbers), max_size=4)),
    st.lists(numbers, max_size=4).map(" ".join),
    st.text(max_size=30),
)
content = st.one_of(st.none(), st.lists(line, max_size=6).map("\n".join).map(str.encode),
                    st.binary(max_size=64))
HUGE_SIZES = ["2MB", "1GB"]
V1_NAMES = sorted({n for names in stats.V1_FILES.values() for n in names}
                  | {f"hugetlb.{s}.{k}" for s in HUGE_SIZES
                     for k in ("usage_in_bytes", "max_usage_in_bytes", "failcnt")})
V2_NAMES = stats.v2_files(HUGE_SIZES)


U64 = 2**64 - 1


def _values(d) -> list[int]:
    if isinstance(d, dict):
        return [v for x in d.values() for v in _values(x)]
    if isinstance(d, list):
        return [v for x in d for v in _values(x)]
    return [d] if isinstance(d, int) and not isinstance(d, bool) else []


def _proto_ok(d: dict) -> None:
    values = _values(d)
    assert all(0 <= v <= U64 for v in values), [v for v in values if not 0 <= v <= U64]
    msg = stats.to_proto(d)
    assert type(msg).FromString(msg.SerializeToString()) == msg


@harness.fuzz_settings(300)
@given(files=st.fixed_dictionaries({}, optional={n: content for n in V1_NAMES}))
def test_v1_stats_of_any_files(files):
    harness.record("parsers.cgroup_v1_stats")
    _proto_ok(stats.v1_stats(files, HUGE_SIZES))


@harness.fuzz_settings(300)
@given(files=st.fixed_dictionaries({}, optional={n: content for n in V2_NAMES}))
def test_v2_stats_of_any_files(files):
    harness.record("parsers.cgroup_v2_stats")
    _proto_ok(stats.v2_stats(files, HUGE_SIZES))


# Regression (finding 6): a value outside uint64 made to_proto raise ValueError, and
# StatsContainer answer INTERNAL.  Each reads 0, as parse_u64's do; the rest of the file stays.
@pytest.mark.parametrize("version,files,where,kept", [
    ("v2", {"memory.stat": b"anon -1\nfile 7\n"}, "memory_stats.stats.anon", "memory_stats.stats.file"),
    ("v2", {"memory.stat": b"anon 18446744073709551616\nfile 7\n"}, "memory_stats.stats.anon",
     "memory_stats.stats.file"),
    ("v2", {"cpu.stat": b"usage_usec 18446744073709552\nnr_periods 7\n"},  # usec x 1000 overflows
     "cpu_stats.cpu_usage.total_usage", "cpu_stats.throttling_data.periods"),
    ("v2", {"cpu.stat": b"nr_throttled -5\nnr_periods 7\n"}, "cpu_stats.throttling_data.throttled_periods",
     "cpu_stats.throttling_data.periods"),
    ("v2", {"memory.max": b"-4096\n", "memory.current": b"7\n"}, "memory_stats.usage.limit",
     "memory_stats.usage.usage"),
    ("v2", {"memory.events": b"max -1\n", "memory.current": b"7\n"}, "memory_stats.usage.failcnt",
     "memory_stats.usage.usage"),
    ("v1", {"cpuacct.stat": b"user 18446744073709551615\nsystem 7\n"},  # ticks -> ns overflows
     "cpu_stats.cpu_usage.usage_in_usermode", "cpu_stats.cpu_usage.usage_in_kernelmode"),
    ("v1", {"cpuacct.usage_percpu": b"-1 7\n"}, "cpu_stats.cpu_usage.percpu_usage.0",
     "cpu_stats.cpu_usage.percpu_usage.1"),
])
def test_stats_values_out_of_uint64_range(version, files, where, kept):
    s = stats.v2_stats(files) if version == "v2" else stats.v1_stats(files, ticks=100)

    def at(path):
        value = s
        for key in path.split("."):
            value = value[int(key)] if isinstance(value, list) else value[key]
        return value

    assert at(where) == 0
    assert at(kept) in (7, 7 * 10**9 // 100)  # the value beside it is kept (v1 cpu: ticks in ns)
    _proto_ok(s)


@pytest.mark.parametrize("name", ["blkio.throttle.io_service_bytes_recursive", "io.stat"])
def test_stats_device_entries_out_of_uint64_range(name):
    line = b"8:0 Read -1\n8:16 Read 7\n-1:0 Read 9\n" if name.startswith("blkio") else \
        b"8:0 rbytes=-1 wbytes=7\n-1:0 rbytes=9\n"
    s = stats.v1_stats({name: line}) if name.startswith("blkio") else stats.v2_stats({name: line})
    entries = s["blkio_stats"]["io_service_bytes_recursive"]
    assert [(e["major"], e["minor"], e["value"]) for e in entries] == [(8, 0, 0), (8, 16 if name.startswith("blkio") else 0, 7)]
    _proto_ok(s)


# --- /proc for metrics -----------------------------------------------------------------------

PROC_FILES = ["self/stat", "self/status", "self/io", "loadavg", "stat", "vmstat", "net/dev",
              "diskstats", "meminfo", "self/mountinfo"]
proc_text = st.one_of(
    st.lists(line, max_size=8).map("\n".join),
    st.sampled_from(["1 (kagent) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 9 10 11",
                     "1 (a) b) S " + " ".join(["7"] * 50), "0.00 0.01 0.05 1/99 1234",
                     "0.1 0.2", "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2", "x: 1 kB\nMemTotal: 99 kB",
                     "Inter-|\n face |\n  lo: 1 2 3", "   8       0 vda 1 2 3 4 5 6 7 8 9 10 11",
                     "36 35 98:0 /mnt1 /mnt2 rw - ext4 /dev/root rw"]),
    st.text(max_size=60),
)


@harness.fuzz_settings(200)
@given(files=st.fixed_dictionaries({}, optional={n: proc_text for n in PROC_FILES}))
def test_metrics_of_any_proc(tmp_path_factory, files):
    harness.record("parsers.metrics_scrape")
    root = tmp_path_factory.mktemp("proc")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, errors="surrogateescape")

    def statvfs(path):
        raise OSError(2, "not in this test")

    text = AgentMetrics(proc=str(root), pid="self", mountinfo=str(root / "self/mountinfo"),
                        statvfs=statvfs).scrape()
    from prometheus_client.parser import text_string_to_metric_families

    assert list(text_string_to_metric_families(text)) is not None  # parseable exposition


# --- mountinfo -------------------------------------------------------------------------------

# The kernel escapes only space, tab, newline and backslash: a path may hold any other
# character, among them what str.split() and str.splitlines() break at (U+0085, U+3000,
# \r, \x0b, \x1c..\x1f, U+2028...).  No NUL: no path has one.
path_text = st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=20).map(lambda s: "/" + s)


def kernel_escape(s: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in s)


@harness.fuzz_settings(300)
@given(mounts=st.lists(st.tuples(path_text, path_text, st.sampled_from(["ext4", "tmpfs", "proc"]),
                                 path_text), max_size=5),
       junk=st.lists(st.text(max_size=40), max_size=3))
def test_mountinfo_round_trips_kernel_escapes(mounts, junk):
    harness.record("parsers.mountinfo")
    lines = [f"{i + 20} 1 0:{i} {kernel_escape(root)} {kernel_escape(mp)} rw,relatime shared:1 - {fs} "
             f"{kernel_escape(src)} rw" for i, (root, mp, fs, src) in enumerate(mounts)]
    parsed = mountinfo.parse("\n".join(lines))
    assert [(m.root, m.mount_point, m.fstype, m.source, m.devno) for m in parsed] == \
        [(r, mp, fs, src, f"0:{i}") for i, (r, mp, fs, src) in enumerate(mounts)]
    for text in junk:
        mountinfo.parse(text)  # never raises: a line that is not a mount is skipped


# Regression (finding 5): lines were split with str.split() (and str.splitlines()), so such a
# character in a mount point shifted every later field, or cut the line in two.
ODD = ["\x85", "\u3000", "\x1c", "\x1d", "\x1e", "\x1f", "\r", "\x0b", "\x0c", "\u2028", "\u2029", "\xa0"]


@pytest.mark.parametrize("odd", ODD, ids=[f"U+{ord(c):04X}" for c in ODD])
def test_mountinfo_path_with_unicode_whitespace(odd):
    line = f"36 35 98:0 / /run/a{odd}-{odd}b rw,relatime - tmpfs tmpfs{odd}x rw\n" \
           f"37 35 8:1 / /d{odd} rw - ext4 /dev/vd{odd}a rw\n"
    first, second = mountinfo.parse(line)
    assert (first.mount_point, first.fstype, first.source, first.super_options) == \
        (f"/run/a{odd}-{odd}b", "tmpfs", f"tmpfs{odd}x", "rw")
    assert (second.mount_point, second.source, second.devno) == (f"/d{odd}", f"/dev/vd{odd}a", "8:1")
    assert filesystems(line) == [(f"/d{odd}", f"vd{odd}a")]


def test_mountinfo_empty_source_is_a_field():
    # mount("", ...) is shown as two spaces: the source is "", the superblock options follow
    (m,) = mountinfo.parse("73 50 0:41 / /tmp/x rw,relatime - tmpfs  rw")
    assert (m.fstype, m.source, m.super_options) == ("tmpfs", "", "rw")


def test_mountinfo_file_keeps_carriage_returns_and_undecodable_names(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_bytes(b"36 35 98:0 / /run/a\rb\xff rw - tmpfs tmpfs rw\n")
    (m,) = mountinfo.read_file(str(path))
    assert os.fsencode(m.mount_point) == b"/run/a\rb\xff"


# --- uevents ---------------------------------------------------------------------------------

keys = st.sampled_from(["ACTION", "DEVPATH", "SUBSYSTEM", "DEVNAME", "SEQNUM", "INTERFACE", "IFINDEX",
                        "MAJOR", "MINOR", "DEVTYPE", ""]) | st.text(max_size=6)
values = st.sampled_from(["add", "remove", "change", "/devices/system/memory/memory7",
                          "/devices/system/cpu/cpu3", "/devices/pci0000:00/0000:00:02.0/virtio2/block/vda",
                          "cpu", "block", "net", "memory", "vda", "12", "18446744073709551615",
                          "99999999999999999999999", "-1", "", "/"]) | st.text(max_size=12)
near_uevent = st.builds(
    lambda head, kvs, tail: (head + "\0" + "\0".join(f"{k}={v}" for k, v in kvs)).encode(
        "utf-8", "surrogateescape") + tail,
    st.sampled_from(["add@/x", "remove@/y", "change@", "noheader", "libudev"]) | st.text(max_size=10),
    st.lists(st.tuples(keys, values), max_size=8),
    st.binary(max_size=8),
)


@harness.fuzz_settings(500)
@given(data=near_uevent | st.binary(max_size=300))
def test_uevent_twins_agree_and_the_registry_takes_anything(tmp_path_factory, data):
    harness.record("parsers.uevent")
    result = uevent.py_parse(data)
    compiled = _fast.load("uevent")
    if compiled is not None:
        assert compiled.parse(data) == result
    elif not NO_EXTENSIONS:
        pytest.fail(f"compiled uevent did not load: {_fast.failures().get('uevent')}")
    if result is not None:
        sysfs = tmp_path_factory.mktemp("sysfs")
        reg = DeviceRegistry(sysfs_root=str(sysfs), max_devices=4)
        reg.handle(result)
        reg.handle(result._replace(action="remove"))
        for _dirpath, _dirs, files in os.walk(sysfs):
            assert not files, "the registry wrote outside memory blocks"


async def test_registry_waits_survive_a_storm_of_junk(tmp_path):
    """Junk events and a raising matcher do not break a wait for a real device."""
    reg = DeviceRegistry(sysfs_root=str(tmp_path), max_devices=8)

    def broken(uev):
        raise RuntimeError("bad matcher")

    bad = asyncio.ensure_future(reg.wait_for(broken, timeout=0.3, what="never"))
    good = asyncio.ensure_future(reg.wait_for(lambda u: u.devname == "vdz", timeout=5, what="vdz"))
    await asyncio.sleep(0)
    for i in range(2000):
        junk = uevent.py_parse(f"add@/j{i}\0ACTION=add\0DEVPATH=/j/{i}\0DEVNAME=j{i}".encode())
        reg.handle(junk)
    reg.handle(uevent.py_parse(b"add@/v\0ACTION=add\0DEVPATH=/devices/v\0DEVNAME=vdz\0SUBSYSTEM=block"))
    assert (await good).devname == "vdz"
    with pytest.raises(Exception, match="never"):
        await bad
    assert len(reg.devices) <= 8
