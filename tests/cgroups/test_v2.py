"""The v2 driver on this machine's real cgroup2 (root), under the test's own directory.

This cgroup2 offers no controller below its top (only hugetlb at the top,
which the tests must not enable there), but freeze, kill, procs, events and
BPF device programs work on any cgroup2 directory, so those run for real.
Resource files and conversions are checked on a fake tree (test_fake_trees.py).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest
from cgroup_support import enter_in_child, read, v2_layout

from kagent.cgroups import bpfdev, new_manager
from kagent.cgroups.manager import FROZEN, THAWED
from kagent.errors import DeadlineExceeded, FailedPrecondition

pytestmark = pytest.mark.root


def manager(test_parent, **kw):
    return new_manager(test_parent, layout=v2_layout(), **kw)


def _usage_usec(m) -> int:
    cpu = dict(line.split() for line in read(os.path.join(m.dir, "cpu.stat")).splitlines())
    return int(cpu["usage_usec"])


def test_create_apply_procs_and_unavailable_controllers(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    assert m.driver == "v2"
    warnings = m.create("/pod/c1", {"memory": {"limit": 64 << 20}, "pids": {"limit": 5},
                                    "cpu": {"shares": 1024}}, container_id="c1")
    assert os.path.isdir(m.dir) and m.dir == os.path.join(v2_layout().unified, test_parent, "pod", "c1")
    # no controller is offered here: each setting is skipped with a reason, none is an error
    assert len(warnings) == 3 and all("controller is not enabled" in w for w in warnings)
    p = probes()
    m.apply(p.pid)
    assert m.pids() == [p.pid]
    assert "populated 1" in read(os.path.join(m.dir, "cgroup.events"))
    with pytest.raises(FailedPrecondition, match="memory.events"):
        m.oom_watch()


def test_freeze_stops_a_busy_loop_and_thaw_restarts_it(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    m.create("c1", {}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    assert p.ask("spin") == "spinning"
    u1 = _usage_usec(m)
    time.sleep(0.15)
    assert _usage_usec(m) > u1
    m.freeze()
    assert m.state() == FROZEN and "frozen 1" in read(os.path.join(m.dir, "cgroup.events"))
    u3 = _usage_usec(m)
    time.sleep(0.3)
    assert _usage_usec(m) == u3, "cpu time grew while frozen"
    m.thaw()
    assert m.state() == THAWED
    time.sleep(0.15)
    assert _usage_usec(m) > u3
    s = m.stats()  # only cpu.stat exists here; the rest reads as zeros
    assert s["cpu_stats"]["cpu_usage"]["total_usage"] >= u3 * 1000 and s["pids_stats"]["current"] == 0


def test_kill_through_cgroup_kill_and_through_freeze(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    m.create("c1", {}, container_id="c1")
    ps = [probes() for _ in range(3)]
    for p in ps:
        m.apply(p.pid)
    assert ps[0].ask("spin") == "spinning"
    assert m.kill_all(signal.SIGTERM) == 3  # freeze → kill → thaw
    assert [p.proc.wait(10) for p in ps] == [-signal.SIGTERM] * 3
    assert m.state() == THAWED
    qs = [probes() for _ in range(2)]
    for q in qs:
        m.apply(q.pid)
    assert m.kill_all(signal.SIGKILL) == 2  # cgroup.kill
    assert [q.proc.wait(10) for q in qs] == [-signal.SIGKILL] * 2


def test_destroy_waits_for_the_cgroup_to_empty(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    m.create("pod/c1", {}, container_id="c1")
    p = probes()
    m.apply(p.pid)
    with pytest.raises(DeadlineExceeded, match=rf"processes \[{p.pid}\]"):
        m.destroy(timeout=0.2)

    def leave() -> None:
        time.sleep(0.3)
        p.send("exit")
        p.proc.wait(10)

    t = threading.Thread(target=leave)
    start = time.monotonic()
    t.start()
    m.destroy(timeout=10)
    t.join()
    assert time.monotonic() - start >= 0.3 and not os.path.exists(m.dir)


@pytest.mark.skipif(bpfdev.BPF_NR is None, reason="no bpf syscall number for this architecture")
def test_devices_through_a_bpf_program(test_parent, probes):
    m = manager(test_parent, default_devices=False)
    m.create("pod/c1", {"devices": [{"allow": False, "access": "rwm"},
                                    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]},
             container_id="c1")
    fd = os.open(m.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(bpfdev.attached(fd)) == 1
        p = probes()
        m.apply(p.pid)
        assert p.ask("open /dev/zero") == f"errno {errno.EPERM}"
        assert p.ask("open /dev/null") == "ok"
        m.set({"devices": [{"allow": False, "access": "rwm"},
                           {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                           {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"}]}, update=True)
        assert len(bpfdev.attached(fd)) == 1  # replaced, not stacked
        assert p.ask("open /dev/zero") == "ok"
        m.set({"memory": {"limit": 1 << 30}}, update=True)  # an update without devices keeps the program
        assert p.ask("open /dev/zero") == "ok" and p.ask("open /dev/kmsg") == f"errno {errno.EPERM}"
    finally:
        os.close(fd)
    m2 = manager(test_parent)  # upstream's default list
    m2.create("pod/c2", {"devices": [{"allow": False, "access": "rwm"}]}, container_id="c2")
    p2 = probes()
    m2.apply(p2.pid)
    assert p2.ask("open /dev/zero") == "ok" and p2.ask("open /dev/kmsg") == f"errno {errno.EPERM}"


def test_a_child_enters_its_cgroup(test_parent):
    """Manager.enter on v2: "0" written to cgroup.procs moves the caller (a forked init)."""
    m = manager(test_parent, default_devices=False)
    m.create("pod/c1", {}, container_id="c1")
    lines = enter_in_child(m).splitlines()
    assert f"0::/{m.path}" in lines, lines
