"""Both drivers against fake trees (directories of plain files) for what this machine lacks.

A real cgroup2 with memory/cpu/io/pids/hugetlb below its top, and v1 hugetlb,
net_cls, net_prio, blkio weights and kmem.tcp, cannot exist here, so the
resource files are plain files.  Plain files keep only the last of several
writes, so the writes are also recorded (a wrapper around the real
fswrite.write_batch, which still writes) and checked in order.
"""

from __future__ import annotations

import os
import select
import shutil

import pytest
from cgroup_support import FIXTURES

from kagent.cgroups import fswrite, stats
from kagent.cgroups.manager import THAWED
from kagent.cgroups.paths import Layout
from kagent.cgroups.v1 import V1Manager
from kagent.cgroups.v2 import V2Manager
from kagent.errors import DeadlineExceeded, InvalidArgument

V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids\n", "cgroup.subtree_control": "",
    "cgroup.procs": "", "cgroup.freeze": "0\n", "cgroup.events": "populated 0\nfrozen 0\n",
    "cpu.weight": "100\n", "cpu.max": "max 100000\n", "cpu.max.burst": "0\n", "cpu.idle": "0\n",
    "cpuset.cpus": "", "cpuset.mems": "", "memory.max": "max\n", "memory.high": "max\n", "memory.low": "0\n", "memory.swap.max": "max\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", "pids.max": "max\n", "io.weight": "default 100\n",
    "io.max": "", "hugetlb.2MB.max": "max\n", "hugetlb.1GB.max": "max\n",
}


def make(directory, files) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


@pytest.fixture
def recorded(monkeypatch):
    """Every (path, value) written through fswrite, in order; the real twin still writes."""
    log: list[tuple[str, str]] = []
    real = fswrite.write_batch

    def record(items):
        items = list(items)
        log.extend((os.fsdecode(p), v if isinstance(v, str) else str(v)) for p, v in items)
        return real(items)

    monkeypatch.setattr(fswrite, "write_batch", record)
    return log


@pytest.fixture
def v2tree(tmp_path):
    root = tmp_path / "cg2"
    for level in ("", "kagent", "kagent/pod", "kagent/pod/c1"):
        make(root / level, V2_FILES)
    return root


def v2manager(root) -> V2Manager:
    return V2Manager(Layout("v2", {}, str(root)), "kagent", default_devices=False)


def short(log, root):
    return [(os.path.relpath(p, root), v) for p, v in log]


def test_v2_create_enables_controllers_down_to_the_pod(writer, v2tree, recorded):
    m = v2manager(v2tree)
    assert m.create("/pod/c1", {}, container_id="c1") == []
    enabled = [(p, v) for p, v in short(recorded, v2tree) if p.endswith("subtree_control")]
    controllers = V2_FILES["cgroup.controllers"].split()
    assert enabled == ([("kagent/cgroup.subtree_control", f"+{c}") for c in controllers]
                       + [("kagent/pod/cgroup.subtree_control", f"+{c}") for c in controllers])


def test_v2_conversions(writer, v2tree, recorded):
    m = v2manager(v2tree)
    m.open("/pod/c1", container_id="c1")
    warnings = m.set({
        "cpu": {"shares": 1024, "quota": 50000, "period": 200000, "cpus": "0-1", "mems": "0", "burst": 1000,
                "realtimeRuntime": 5},
        "memory": {"limit": 256 << 20, "swap": 384 << 20, "reservation": 64 << 20, "kernel": 1, "swappiness": 5,
                   "disableOOMKiller": True},
        "pids": {"limit": 42},
        "blockIO": {"weight": 500, "leafWeight": 300,
                    "weightDevice": [{"major": 8, "minor": 0, "weight": 100}],
                    "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
                    "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 0}]},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}, {"pagesize": "1GB", "limit": 1 << 30}],
        "network": {"classID": 7},
        "unified": {"memory.high": "200000000"},
    }, update=True)
    assert short(recorded, v2tree) == [
        ("kagent/pod/c1/cpuset.cpus", "0-1"),
        ("kagent/pod/c1/cpuset.mems", "0"),
        ("kagent/pod/c1/cpu.weight", "39"),
        ("kagent/pod/c1/cpu.max", "50000 200000"),
        ("kagent/pod/c1/cpu.max.burst", "1000"),
        ("kagent/pod/c1/memory.max", str(256 << 20)),
        ("kagent/pod/c1/memory.swap.max", str(128 << 20)),
        ("kagent/pod/c1/memory.low", str(64 << 20)),
        ("kagent/pod/c1/pids.max", "42"),
        ("kagent/pod/c1/io.weight", f"default {1 + (490 * 9999) // 990}"),
        ("kagent/pod/c1/io.weight", f"8:0 {1 + (90 * 9999) // 990}"),
        ("kagent/pod/c1/io.max", "8:0 rbps=1048576"),
        ("kagent/pod/c1/io.max", "8:0 wiops=max"),
        ("kagent/pod/c1/hugetlb.2MB.max", str(4 << 20)),
        ("kagent/pod/c1/hugetlb.1GB.max", str(1 << 30)),
        ("kagent/pod/c1/memory.high", "200000000"),
    ]
    assert sorted(w.split(":")[0] for w in warnings) == [
        "blockIO.leafWeight", "cpu.realtimeRuntime/realtimePeriod", "memory.disableOOMKiller",
        "memory.swappiness", "network classID/priorities have no cgroup v2 equivalent; skipped"]


def test_v2_cpu_max_keeps_the_quota_when_only_the_period_changes(v2tree, recorded):
    m = v2manager(v2tree).open("pod/c1", container_id="c1")
    (v2tree / "kagent/pod/c1/cpu.max").write_text("30000 100000\n")
    m.set({"cpu": {"period": 50000}}, update=True)
    m.set({"cpu": {"quota": -1}}, update=True)
    assert [v for _, v in recorded] == ["30000 50000", "max"]


def test_v2_refusals(v2tree):
    m = v2manager(v2tree).open("pod/c1", container_id="c1")
    with pytest.raises(InvalidArgument, match="needs a memory.limit"):
        m.set({"memory": {"swap": 1 << 30}}, update=True)
    with pytest.raises(InvalidArgument, match="invalid cgroup file name"):
        m.set({"unified": {"../x": "1"}}, update=True)
    (v2tree / "kagent/pod/c1/cgroup.controllers").write_text("cpu\n")
    with pytest.raises(InvalidArgument, match="memory controller is not enabled"):
        m.set({"unified": {"memory.high": "1"}}, update=True)


def test_v2_stats_read_through_the_driver(writer, v2tree):
    d = v2tree / "kagent/pod/c1"
    for name in os.listdir(os.path.join(FIXTURES, "v2")):
        if not name.startswith(("real.", "README")):
            shutil.copyfile(os.path.join(FIXTURES, "v2", name), d / name)
    (d / "hugetlb.1GB.max").unlink()
    m = v2manager(v2tree).open("pod/c1", container_id="c1")
    files = {n: (d / n).read_bytes() if (d / n).exists() else None for n in stats.v2_files(["2MB"])}
    assert m.stats() == stats.v2_stats(files, ["2MB"])
    assert m.stats()["memory_stats"]["usage"]["limit"] == 268435456


def test_v2_freeze_is_bounded(v2tree):
    m = v2manager(v2tree).open("pod/c1", container_id="c1")
    with pytest.raises(DeadlineExceeded, match="did not freeze within 0.1s"):
        m.freeze(timeout=0.1)  # a plain file never reports "frozen 1"
    assert (v2tree / "kagent/pod/c1/cgroup.freeze").read_text().strip() == "0" and m.state() == THAWED


def test_v2_oom_watch_with_inotify(v2tree):
    d = v2tree / "kagent/pod/c1"
    m = v2manager(v2tree).open("pod/c1", container_id="c1")
    with m.oom_watch() as watch:
        assert watch.read() == 0
        (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        assert select.select([watch.fileno()], [], [], 5)[0]
        assert watch.read() == 1 and watch.read() == 0
        (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 3\noom_kill 3\n")
        (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        assert select.select([watch.fileno()], [], [], 5)[0]
        assert watch.read() == 2  # two kills since the last read, none lost
        assert not watch.closed_by_kernel
        (d / "memory.events").unlink()  # the cgroup went away
        assert select.select([watch.fileno()], [], [], 5)[0]
        assert watch.read() == 0 and watch.closed_by_kernel
    with pytest.raises(ValueError):
        watch.fileno()


# --- v1 files this machine has no hierarchy or kernel support for ------------------------------

V1_FILES = {
    "hugetlb": {"hugetlb.2MB.limit_in_bytes": "", "hugetlb.2MB.usage_in_bytes": "2097152\n",
                "hugetlb.2MB.max_usage_in_bytes": "4194304\n", "hugetlb.2MB.failcnt": "1\n", "cgroup.procs": ""},
    "net_cls": {"net_cls.classid": "0\n", "cgroup.procs": ""},
    "net_prio": {"net_prio.ifpriomap": "", "cgroup.procs": ""},
    "blkio": {"blkio.weight": "", "blkio.leaf_weight": "", "blkio.weight_device": "", "blkio.leaf_weight_device": "",
              "blkio.throttle.read_bps_device": "", "cgroup.procs": ""},
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.kmem.tcp.limit_in_bytes": "",
               "memory.swappiness": "60\n", "memory.oom_control": "", "memory.soft_limit_in_bytes": "",
               "cgroup.procs": ""},
}


def test_v1_files_missing_here(writer, tmp_path, recorded):
    layout = Layout("v1", {c: str(tmp_path / c) for c in V1_FILES})
    for c, files in V1_FILES.items():
        for level in ("kagent", "kagent/c1"):
            make(tmp_path / c / level, files)
    m = V1Manager(layout, "kagent", default_devices=False)
    warnings = m.create("c1", {
        "memory": {"limit": 64 << 20, "kernelTCP": 1 << 20, "disableOOMKiller": True, "swap": 128 << 20},
        "blockIO": {"weight": 500, "leafWeight": 300, "weightDevice": [{"major": 8, "minor": 0, "weight": 100,
                                                                        "leafWeight": 50}]},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
        "network": {"classID": 0x100001, "priorities": [{"name": "eth0", "priority": 5},
                                                        {"name": "lo", "priority": 1}]},
        "cpu": {"shares": 100},
        "devices": [{"allow": False, "access": "rwm"}],
    }, container_id="c1")
    assert short(recorded, tmp_path) == [
        ("memory/kagent/c1/memory.limit_in_bytes", str(64 << 20)),
        ("memory/kagent/c1/memory.kmem.tcp.limit_in_bytes", str(1 << 20)),
        ("memory/kagent/c1/memory.oom_control", "1"),
        ("blkio/kagent/c1/blkio.weight", "500"),
        ("blkio/kagent/c1/blkio.leaf_weight", "300"),
        ("blkio/kagent/c1/blkio.weight_device", "8:0 100"),
        ("blkio/kagent/c1/blkio.leaf_weight_device", "8:0 50"),
        ("hugetlb/kagent/c1/hugetlb.2MB.limit_in_bytes", str(4 << 20)),
        ("net_cls/kagent/c1/net_cls.classid", str(0x100001)),
        ("net_prio/kagent/c1/net_prio.ifpriomap", "eth0 5"),
        ("net_prio/kagent/c1/net_prio.ifpriomap", "lo 1"),
    ]
    assert sorted(warnings) == [
        "cpu.shares: the cpu controller is not mounted; skipped",
        "devices: the devices controller is not mounted; skipped",
        "memory.swap: swap accounting is off (no memory.memsw.limit_in_bytes); skipped",
    ]
    assert m.stats()["hugetlb_stats"] == {"2MB": {"usage": 2097152, "max_usage": 4194304, "failcnt": 1}}
    with pytest.raises(InvalidArgument, match="cannot be applied on cgroup v1"):
        m.set({"unified": {"memory.high": "1"}}, update=True)
