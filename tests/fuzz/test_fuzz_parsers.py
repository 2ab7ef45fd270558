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
from kagent.metrics import AgentMetrics
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


def _proto_ok(d: dict, what: str) -> None:
    try:
        msg = stats.to_proto(d)
    except ValueError as exc:
        # Known finding (see test_stats_values_out_of_uint64_range): only with values no
        # kernel writes; anything else is a new bug.
        assert any(not 0 <= v <= U64 for v in _values(d)), exc
        harness.finding(f"{what}: to_proto raises ValueError when a file holds a value outside uint64 "
                        "(see test_stats_values_out_of_uint64_range)")
        return
    type(msg).FromString(msg.SerializeToString())


@harness.fuzz_settings(300)
@given(files=st.fixed_dictionaries({}, optional={n: content for n in V1_NAMES}))
def test_v1_stats_of_any_files(files):
    harness.record("parsers.cgroup_v1_stats")
    _proto_ok(stats.v1_stats(files, HUGE_SIZES), "cgroup v1 stats")


@harness.fuzz_settings(300)
@given(files=st.fixed_dictionaries({}, optional={n: content for n in V2_NAMES}))
def test_v2_stats_of_any_files(files):
    harness.record("parsers.cgroup_v2_stats")
    _proto_ok(stats.v2_stats(files, HUGE_SIZES), "cgroup v2 stats")


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "finding: kagent/cgroups/stats.py passes flat-keyed values through unchecked, and "
    "to_proto raises ValueError for one outside uint64 (StatsContainer then answers INTERNAL). "
    "Fix: clamp in parse_flat (or to_proto) to 0..2**64-1, as parse_u64 does"))
@pytest.mark.parametrize("files", [{"memory.stat": b"anon -1\n"},
                                   {"cpu.stat": b"usage_usec 18446744073709552\n"}])
def test_stats_values_out_of_uint64_range(files):
    stats.to_proto(stats.v2_stats(files))


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

# The kernel escapes only space, tab, newline and backslash; Python's str.split() also splits
# on other Unicode whitespace (U+0085, U+3000, \x1c..\x1f), which a path may hold: see
# test_mountinfo_path_with_unicode_whitespace (a finding).  Generated paths avoid those.
_SPLIT_BY_PYTHON = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \t\n")
path_text = st.text(st.characters(blacklist_characters="\x00" + _SPLIT_BY_PYTHON,
                                  blacklist_categories=("Cs",)),
                    min_size=1, max_size=20).map(lambda s: "/" + s)


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
    assert [(m.root, m.mount_point, m.fstype, m.source) for m in parsed] == \
        [(r, mp, fs, src) for r, mp, fs, src in mounts]
    for text in junk:
        try:
            mountinfo.parse(text)
        except ValueError:
            pass  # a non-numeric id: only a kernel bug could write that


@pytest.mark.xfail(strict=True, reason=(
    "finding: kagent/runtime/mountinfo.py (and kagent/metrics.py filesystems()) split lines "
    "with str.split(), which also splits on Unicode whitespace the kernel does not escape "
    "(U+0085, U+3000, \\x1c-\\x1f): a mount point such as one UpdateEphemeralMounts or a storage "
    "makes from a host-given path then shifts every later field.  Fix: line.split(' ')"))
@pytest.mark.parametrize("odd", ["\x85", "\u3000", "\x1c"])
def test_mountinfo_path_with_unicode_whitespace(odd):
    line = f"36 35 98:0 / /run/a{odd}-{odd}b rw,relatime - tmpfs tmpfs rw"
    (m,) = mountinfo.parse(line)
    assert (m.mount_point, m.fstype, m.source) == (f"/run/a{odd}-{odd}b", "tmpfs", "tmpfs")


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
