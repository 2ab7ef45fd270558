"""The v1 driver on this machine's real v1 hierarchies (root).

Each test makes its own ``kagent-test-*`` parent, moves only the probe
children it started, and the fixtures remove everything afterwards.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time

import pytest
from cgroup_support import enter_in_child, read, v1_layout, write

from kagent.cgroups import fswrite, new_manager, update_cpuset_path
from kagent.cgroups.manager import FROZEN, THAWED
from kagent.errors import DeadlineExceeded, InvalidArgument, NotFound, PermissionDenied

pytestmark = pytest.mark.root


def f(m, controller: str, name: str, rel: str | None = None) -> str:
    return os.path.join(m.layout.v1[controller], rel or m.path, name)


def vda() -> tuple[int, int]:
    with open("/proc/partitions") as fh:
        for line in fh.readlines()[2:]:
            major, minor, _blocks, name = line.split()
            if name in ("vda", "sda", "nvme0n1"):
                return int(major), int(minor)
    pytest.skip("no vda/sda/nvme0n1 in /proc/partitions")


def manager(test_parent, **kw):
    return new_manager(test_parent, layout=v1_layout(), **kw)


def test_limits_written_and_read_back(writer, test_parent):
    major, minor = vda()
    m = manager(test_parent)
    warnings = m.create("/pod1/c1", {
        "cpu": {"shares": 512, "quota": 50000, "period": 200000, "cpus": "1", "mems": "0", "realtimePeriod": 500000},
        "memory": {"limit": 64 << 20, "swap": 128 << 20, "reservation": 32 << 20, "swappiness": 10, "kernel": 1 << 20},
        "pids": {"limit": 20},
        "blockIO": {"weight": 500,
                    "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1048576}],
                    "throttleWriteBpsDevice": [{"major": major, "minor": minor, "rate": 2097152}],
                    "throttleReadIOPSDevice": [{"major": major, "minor": minor, "rate": 100}],
                    "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 200}]},
        "devices": [{"allow": False, "access": "rwm"}],
    }, container_id="c1")
    assert m.path == f"{test_parent}/pod1/c1" and m.pod_path == f"{test_parent}/pod1"
    assert read(f(m, "cpu", "cpu.shares")) == "512"
    assert read(f(m, "cpu", "cpu.cfs_quota_us")) == "50000"
    assert read(f(m, "cpu", "cpu.cfs_period_us")) == "200000"
    assert read(f(m, "cpu", "cpu.rt_period_us")) == "500000"
    assert read(f(m, "cpuset", "cpuset.cpus")) == "1" and read(f(m, "cpuset", "cpuset.mems")) == "0"
    assert read(f(m, "cpuset", "cpuset.cpus", m.pod_path)) == read("/sys/fs/cgroup/cpuset/cpuset.cpus")
    assert read(f(m, "memory", "memory.limit_in_bytes")) == str(64 << 20)
    assert read(f(m, "memory", "memory.memsw.limit_in_bytes")) == str(128 << 20)
    assert read(f(m, "memory", "memory.soft_limit_in_bytes")) == str(32 << 20)
    assert read(f(m, "memory", "memory.swappiness")) == "10"
    assert read(f(m, "pids", "pids.max")) == "20"
    assert read(f(m, "blkio", "blkio.throttle.read_bps_device")) == f"{major}:{minor} 1048576"
    assert read(f(m, "blkio", "blkio.throttle.write_bps_device")) == f"{major}:{minor} 2097152"
    assert read(f(m, "blkio", "blkio.throttle.read_iops_device")) == f"{major}:{minor} 100"
    assert read(f(m, "blkio", "blkio.throttle.write_iops_device")) == f"{major}:{minor} 200"
    devices = read(f(m, "devices", "devices.list")).splitlines()
    assert "a *:* rwm" not in devices and "c 1:3 rwm" in devices and "c 136:* rwm" in devices
    pod_devices = read(f(m, "devices", "devices.list", m.pod_path)).splitlines()
    assert "a *:* rwm" not in pod_devices and "c 1:5 rwm" in pod_devices
    # this kernel has no blkio.weight (mq-deadline): skipped with a warning, not an error
    assert any("blockIO.weight" in w for w in warnings)

    # an update touches only what it names
    assert m.set({"cpu": {"quota": -1}, "pids": {"limit": 0}}, update=True) == []
    assert read(f(m, "cpu", "cpu.cfs_quota_us")) == "-1" and read(f(m, "pids", "pids.max")) == "max"
    assert read(f(m, "cpu", "cpu.shares")) == "512"
    assert "c 1:3 rwm" in read(f(m, "devices", "devices.list"))


def test_memory_limit_and_memsw_in_both_orders(writer, test_parent):
    m = manager(test_parent)
    m.create("c1", {"memory": {"limit": 64 << 20, "swap": 128 << 20}}, container_id="c1")
    limit, memsw = f(m, "memory", "memory.limit_in_bytes"), f(m, "memory", "memory.memsw.limit_in_bytes")
    # the kernel's rule, shown directly: a limit above memsw is refused
    with pytest.raises(OSError) as info:
        fswrite.write_batch([(limit, str(256 << 20))])
    assert info.value.errno == errno.EINVAL

    m.set({"memory": {"limit": 256 << 20, "swap": 512 << 20}}, update=True)  # raising: memsw first
    assert (read(limit), read(memsw)) == (str(256 << 20), str(512 << 20))
    m.set({"memory": {"limit": 32 << 20, "swap": 48 << 20}}, update=True)  # lowering: limit first
    assert (read(limit), read(memsw)) == (str(32 << 20), str(48 << 20))
    m.set({"memory": {"limit": 100 << 20, "swap": 120 << 20}}, update=True)  # new memsw above old limit
    assert (read(limit), read(memsw)) == (str(100 << 20), str(120 << 20))
    m.set({"memory": {"limit": 110 << 20}}, update=True)  # a limit alone, within memsw
    assert read(limit) == str(110 << 20)

    with pytest.raises(InvalidArgument, match="above the current memory\\+swap limit"):
        m.set({"memory": {"limit": 200 << 20}}, update=True)
    with pytest.raises(InvalidArgument, match="must be >= memory.limit"):
        m.set({"memory": {"limit": 200 << 20, "swap": 100 << 20}}, update=True)
    with pytest.raises(InvalidArgument, match="swappiness"):
        m.set({"memory": {"swappiness": 101}}, update=True)
    assert (read(limit), read(memsw)) == (str(110 << 20), str(120 << 20))  # nothing half-applied

    m.set({"memory": {"limit": -1, "swap": -1}}, update=True)
    assert int(read(limit)) > 1 << 60 and int(read(memsw)) > 1 << 60


def test_devices_deny_then_allow(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    m.create("pod/c1", {"devices": [{"allow": False, "access": "rwm"},
                                    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]},
             container_id="c1")
    p = probes()
    m.apply(p.pid)
    assert p.ask("open /dev/zero") == f"errno {errno.EPERM}"
    assert p.ask("open /dev/null") == "ok"
    m.set({"devices": [{"allow": False, "access": "rwm"},
                       {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                       {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"}]}, update=True)
    assert p.ask("open /dev/zero") == "ok"
    assert "c 1:5 r" in read(f(m, "devices", "devices.list", m.pod_path))  # the pod allows it too

    # with the defaults (upstream's list), /dev/zero is allowed but not /dev/kmsg
    m2 = manager(test_parent)
    m2.create("pod/c2", {"devices": [{"allow": False, "access": "rwm"}]}, container_id="c2")
    p2 = probes()
    m2.apply(p2.pid)
    assert p2.ask("open /dev/zero") == "ok"
    assert p2.ask("open /dev/kmsg") == f"errno {errno.EPERM}"


def test_memory_limit_oom_kills_and_the_oom_fd_fires(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {"memory": {"limit": 48 << 20, "swap": 48 << 20}}, container_id="c1")
    with m.oom_watch() as watch:
        assert watch.read() == 0  # nothing yet, and read never blocks
        p = probes()
        m.apply(p.pid)
        p.send("alloc 256")
        assert p.proc.wait(20) == -signal.SIGKILL
        ready, _, _ = select.select([watch.fileno()], [], [], 5)
        assert ready, "the OOM eventfd did not fire"
        assert watch.read() == 1
        assert watch.read() == 0  # delivered once
        s = m.stats()
        failcnt = int(read(f(m, "memory", "memory.failcnt")))
        m.destroy()  # the kernel signals the eventfd once more when the cgroup goes
        assert select.select([watch.fileno()], [], [], 5)[0]
        assert watch.read() == 0 and watch.closed_by_kernel
    mem = s["memory_stats"]
    # the peak reached the limit (this kernel leaves v1 failcnt at 0: stats mirror the file)
    assert mem["usage"]["max_usage"] == mem["usage"]["limit"] == 48 << 20
    assert mem["usage"]["failcnt"] == failcnt


def test_pids_limit_stops_a_fork_loop(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {"pids": {"limit": 5}}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    assert p.ask("fork 50") == "4"  # the probe itself is the fifth
    assert int(read(f(m, "pids", "pids.events")).split()[1]) > 0
    assert m.stats()["pids_stats"] == {"current": 1, "limit": 5}


def _usage(m) -> int:
    return int(read(f(m, "cpuacct", "cpuacct.usage")))


def test_freeze_stops_a_busy_loop_and_thaw_restarts_it(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    assert p.ask("spin") == "spinning"
    u1 = _usage(m)
    time.sleep(0.15)
    assert _usage(m) > u1
    m.freeze()
    assert m.state() == FROZEN
    u3 = _usage(m)
    time.sleep(0.3)
    assert _usage(m) == u3, "cpu time grew while frozen"
    m.thaw()
    assert m.state() == THAWED
    time.sleep(0.15)
    assert _usage(m) > u3


def test_cpu_quota_observed_in_cpuacct(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {"cpu": {"quota": 10000, "period": 100000}}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    u0 = _usage(m)
    assert p.ask("busy 0.6") == "done"
    used = (_usage(m) - u0) / 1e9
    assert used < 0.6 * 0.1 * 2, f"used {used:.3f}s of cpu in 0.6s at a 10% quota"
    throttling = m.stats()["cpu_stats"]["throttling_data"]
    assert throttling["throttled_periods"] > 0 and throttling["periods"] >= throttling["throttled_periods"]
    # UpdateContainer on the running container: the quota goes, the loop runs at full speed
    m.set({"cpu": {"quota": -1}}, update=True)
    u1 = _usage(m)
    assert p.ask("busy 0.4") == "done"
    assert (_usage(m) - u1) / 1e9 > 0.1  # well above the 0.04 s the 10% quota allowed


def test_kill_all(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {}, container_id="c1")
    ps = [probes() for _ in range(3)]
    for p in ps:
        m.apply(p.pid)
    assert sorted(m.pids()) == sorted(p.pid for p in ps)
    assert m.kill_all(signal.SIGTERM) == 3
    assert [p.proc.wait(10) for p in ps] == [-signal.SIGTERM] * 3
    assert m.state() == THAWED  # thawed again after the kill
    assert m.kill_all() == 0


def test_stats_cross_checked_against_the_files(test_parent, probes):
    m = manager(test_parent)
    m.create("c1", {"memory": {"limit": 128 << 20}, "pids": {"limit": 9}}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    assert p.ask("alloc 8") == str(8 << 20)
    assert p.ask("busy 0.1") == "done"  # then idle: the files stay put while we compare
    s = m.stats()
    cpu = s["cpu_stats"]["cpu_usage"]
    assert cpu["total_usage"] == int(read(f(m, "cpuacct", "cpuacct.usage"))) > 0
    assert cpu["percpu_usage"] == [int(x) for x in read(f(m, "cpuacct", "cpuacct.usage_percpu")).split()]
    ticks = os.sysconf("SC_CLK_TCK")
    stat = dict(line.split() for line in read(f(m, "cpuacct", "cpuacct.stat")).splitlines())
    assert cpu["usage_in_usermode"] == int(stat["user"]) * 10**9 // ticks
    mem = s["memory_stats"]
    for key, name in (("usage", "usage_in_bytes"), ("max_usage", "max_usage_in_bytes"), ("limit", "limit_in_bytes")):
        assert mem["usage"][key] == int(read(f(m, "memory", f"memory.{name}")))
        assert mem["swap_usage"][key] == int(read(f(m, "memory", f"memory.memsw.{name}")))
    assert mem["usage"]["usage"] >= 8 << 20 and mem["usage"]["limit"] == 128 << 20
    assert mem["stats"]["rss"] == int(dict(x.split() for x in read(f(m, "memory", "memory.stat")).splitlines())["rss"])
    assert s["pids_stats"] == {"current": 1, "limit": 9}
    from kagent.cgroups import to_proto

    assert to_proto(s).memory_stats.usage.limit == 128 << 20


def test_cpuset_propagation_pins_a_container_to_cpu_1(test_parent, probes):
    if len(os.sched_getaffinity(0)) < 2 or "1" not in read("/sys/fs/cgroup/cpuset/cpuset.cpus").replace("-", ","):
        pytest.skip("needs CPUs 0 and 1")
    m = manager(test_parent)
    m.create("/pod/c1", {"cpu": {"cpus": "0"}}, container_id="c1")
    # as in a guest booted with one CPU: the whole tree holds only CPU 0 (narrowed bottom-up)
    for rel in (m.pod_path, test_parent):
        write(f(m, "cpuset", "cpuset.cpus", rel), "0")
    p = probes()
    m.apply(p.pid)
    assert p.ask("cpus") == "0"
    with pytest.raises(PermissionDenied, match="cannot write '1' to .*/pod/c1/cpuset.cpus"):
        m.set({"cpu": {"cpus": "1"}}, update=True)  # a child cannot leave its parent's cpus (EACCES)
    m.update_cpuset("0-1", "1")  # CPU 1 came online: parents widened top-down, then the container
    assert read(f(m, "cpuset", "cpuset.cpus", test_parent)) == "0-1"
    assert read(f(m, "cpuset", "cpuset.cpus", m.pod_path)) == "0-1"
    assert read(f(m, "cpuset", "cpuset.cpus")) == "1"
    assert p.ask("cpus") == "1"
    assert p.ask("where 0.2") == "1"  # it actually runs there
    with pytest.raises(InvalidArgument):
        m.update_cpuset("0-x", "1")


def test_destroy_waits_for_the_cgroup_to_empty(test_parent, probes):
    m = manager(test_parent)
    m.create("pod/c1", {}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    with pytest.raises(DeadlineExceeded, match="still busy"):
        m.destroy(timeout=0.2)
    assert all(os.path.isdir(d) for d in m.dirs())

    def leave() -> None:
        time.sleep(0.3)
        p.send("exit")
        p.proc.wait(10)

    t = threading.Thread(target=leave)
    start = time.monotonic()
    t.start()
    m.destroy(timeout=10)
    t.join()
    assert time.monotonic() - start >= 0.3
    assert not any(os.path.exists(d) for d in m.dirs())
    assert os.path.isdir(f(m, "memory", "", m.pod_path))  # the pod cgroup stays for its other containers
    with pytest.raises(NotFound):
        manager(test_parent).open("pod/c1", container_id="c1")


def test_open_binds_to_an_existing_cgroup(test_parent, probes):
    m = manager(test_parent)
    m.create("pod/c1", {"pids": {"limit": 7}}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    again = manager(test_parent).open("/pod/c1", container_id="c1")
    assert again.pids() == [p.pid] and again.stats()["pids_stats"]["limit"] == 7
    assert again.state() == THAWED


def test_update_cpuset_path_by_cgroups_path(test_parent):
    if "1" not in read("/sys/fs/cgroup/cpuset/cpuset.cpus").replace("-", ","):
        pytest.skip("needs CPU 1")
    m = manager(test_parent)
    m.create("/kubepods/podA/c9", {"cpu": {"cpus": "0"}}, container_id="c9")
    update_cpuset_path("0-1", "/kubepods/podA/c9", "1", parent=test_parent, container_id="c9", layout=m.layout)
    assert read(f(m, "cpuset", "cpuset.cpus")) == "1"
    assert read(f(m, "cpuset", "cpuset.cpus", f"{test_parent}/kubepods")) == "0-1"
    with pytest.raises(NotFound):
        update_cpuset_path("0-1", "/kubepods/podA/none", "1", parent=test_parent, layout=m.layout)


def test_a_child_enters_its_cgroup_in_every_hierarchy(test_parent):
    """Manager.enter (the forked init's own placement, through 'tasks') lands where apply(pid)
    would: the container's cgroup in every hierarchy the manager uses."""
    m = manager(test_parent)
    m.create("pod/c1", {}, container_id="c1")
    assert m.self_file == "tasks"
    lines = enter_in_child(m)
    assert not lines.startswith("error"), lines
    placed = {}
    for line in lines.splitlines():
        _id, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            placed[c.removeprefix("name=")] = path
    for controller in m.layout.v1:
        if controller in placed:
            assert placed[controller] == "/" + m.path, (controller, lines)
    assert m.pids() == []  # the child is gone: nothing left behind


def test_enter_names_the_cgroup_when_it_fails(test_parent):
    """A cpuset cgroup without CPUs takes no task (ENOSPC): the child gets an error naming it."""
    m = manager(test_parent)
    m.create("c1", {}, container_id="c1")
    if "cpuset" not in m.layout.v1:
        pytest.skip("no cpuset hierarchy")
    write(f(m, "cpuset", "cpuset.cpus"), "\n")  # (an empty write would not reach the kernel)
    out = enter_in_child(m)
    assert out.startswith("error") and f"enter cgroup {m.path}" in out, out
