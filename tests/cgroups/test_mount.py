"""Init-mode mounting: the plan (pure), and the real mounts in a private namespace (root).

The real runs happen in a forked child that first joins the test's own cgroups,
then unshares its mount *and cgroup* namespaces and makes / private: its mounts
vanish with it, and a cgroup mount in a non-initial cgroup namespace is rooted
at the test's cgroup and cannot change the host's cgroup2 options (nsdelegate
is a superblock-wide flag that only the initial cgroup namespace may set).
Only controllers the host already mounts as v1 are listed in the /proc/cgroups
the v1 run reads: mounting any other would create (or steal from cgroup2) a
hierarchy for the whole machine.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
from cgroup_support import FIXTURES, v1_layout, v2_layout

from kagent.cgroups import new_manager
from kagent.cgroups.mount import MountStep, mount_cgroups, parse_proc_cgroups, plan
from kagent.runtime import mountinfo, syscalls
from kagent.runtime.syscalls import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RELATIME

BASE = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_parse_proc_cgroups():
    assert parse_proc_cgroups(_fixture("proc_cgroups")) == [
        "cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls", "perf_event",
        "net_prio", "hugetlb", "pids"]
    text = ("#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
            "cpu\t1\t1\t1\nmemory\t2\t5\t0\nshort\t1\nbogus\t1\t1\t1\ndevices\tx\t1\t1\n"
            "pids 3 1 1\nmisc\t0\t1\t1\n")
    assert parse_proc_cgroups(text) == ["cpu", "pids"]  # disabled, short, unknown, non-numeric: skipped


def test_plan():
    assert plan(True, "/sys/fs/cgroup", "") == [
        MountStep("cgroup2", "/sys/fs/cgroup", "cgroup2", BASE | MS_RELATIME, "nsdelegate,favordynmods")]
    steps = plan(False, "/r", "cpu\t1\t1\t1\ncpuacct\t2\t1\t1\ndevices\t3\t1\t1\n")
    assert steps == [
        MountStep("tmpfs", "/r", "tmpfs", BASE, "mode=755"),
        MountStep("cgroup", "/r/cpu", "cgroup", BASE | MS_RELATIME, "cpu"),
        MountStep("cgroup", "/r/cpuacct", "cgroup", BASE | MS_RELATIME, "cpuacct"),  # not co-mounted
        MountStep("cgroup", "/r/devices", "cgroup", BASE | MS_RELATIME, "devices"),
    ]
    assert plan(False, "/r", "cpu\t1\t1\t1\nmemory\t2\t1\t1\n") == []  # no devices: nothing at all


def _in_private_namespace(body, join, top: str) -> dict:
    """Run body(top) in a forked child with its own mount and cgroup namespaces, a tmpfs
    mounted on ``top`` there; its JSON result."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(rfd)
            join()
            syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWCGROUP)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            syscalls.mount("tmpfs", top, "tmpfs", 0, "mode=700,size=1m")
            result = body(top)
            os.write(wfd, json.dumps(result).encode())
            code = 0
        except BaseException:
            os.write(wfd, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in result, result.get("error")
    assert os.waitstatus_to_exitcode(status) == 0
    return result


def _host_cgroup_mounts() -> list[tuple]:
    return sorted((m.mount_point, m.fstype, m.options, m.super_options) for m in mountinfo.read()
                  if m.fstype in ("cgroup", "cgroup2", "tmpfs"))


@pytest.mark.root
def test_mount_v2_in_a_private_namespace(test_parent, tmp_path):
    layout = v2_layout()
    m = new_manager(test_parent, layout=layout, default_devices=False)
    m.create("mnt", {}, container_id="mnt")
    before = _host_cgroup_mounts()

    def body(top: str) -> dict:
        root = os.path.join(top, "cgroup")
        done = mount_cgroups(True, root=root)
        mine = [x for x in mountinfo.read() if x.mount_point == root]
        with open(os.path.join(root, "cgroup.procs")) as f:
            procs = f.read().split()
        return {"done": done, "fstype": mine[-1].fstype, "procs": procs, "me": str(os.getpid()),
                "files": sorted(os.listdir(root))}

    result = _in_private_namespace(body, lambda: m.apply(os.getpid()), str(tmp_path))
    assert result["done"] == [f"{tmp_path}/cgroup"] and result["fstype"] == "cgroup2"
    assert result["procs"] == [result["me"]]  # rooted at the test's cgroup: only the child is there
    assert "cgroup.freeze" in result["files"] and "cgroup.subtree_control" in result["files"]
    assert _host_cgroup_mounts() == before  # no mount leaked, no host superblock option changed


@pytest.mark.root
def test_mount_v1_in_a_private_namespace(test_parent, tmp_path):
    layout = v1_layout()
    m = new_manager(test_parent, layout=layout, default_devices=False)
    m.create("mnt", {}, container_id="mnt")
    with open("/proc/cgroups") as f:
        lines = f.read().splitlines()
    mounted = set(layout.v1)
    safe = [ln for ln in lines if ln.startswith("#") or ln.split("\t")[0] in mounted]
    (tmp_path / "ns").mkdir()
    proc_cgroups = tmp_path / "cgroups"
    proc_cgroups.write_text("\n".join(safe) + "\n")
    before = _host_cgroup_mounts()

    def body(top: str) -> dict:
        root = os.path.join(top, "cgroup")
        done = mount_cgroups(False, root=root, proc_cgroups=str(proc_cgroups))
        mounts = {x.mount_point: x for x in mountinfo.read() if x.mount_point.startswith(root)}
        try:
            os.mkdir(os.path.join(root, "extra"))
            read_only = False
        except OSError:
            read_only = True
        with open(os.path.join(root, "memory", "memory.use_hierarchy")) as f:
            use_hierarchy = f.read().strip()
        with open(os.path.join(root, "cpu", "cgroup.procs")) as f:
            procs = f.read().split()
        return {"done": done, "me": str(os.getpid()), "procs": procs, "use_hierarchy": use_hierarchy,
                "read_only": read_only, "root_opts": mounts[root].options,
                "types": {k: (v.fstype, v.super_options) for k, v in mounts.items()}}

    result = _in_private_namespace(body, lambda: m.apply(os.getpid()), str(tmp_path / "ns"))
    root = f"{tmp_path}/ns/cgroup"
    assert result["done"][0] == root and sorted(result["done"][1:]) == sorted(f"{root}/{c}" for c in mounted)
    assert result["read_only"] and result["root_opts"].startswith("ro")
    assert result["types"][root][0] == "tmpfs"
    for c in mounted:
        fstype, opts = result["types"][f"{root}/{c}"]
        assert fstype == "cgroup" and c in opts.split(",")
    assert result["procs"] == [result["me"]] and result["use_hierarchy"] == "1"
    assert _host_cgroup_mounts() == before


def test_mount_without_devices_mounts_nothing(tmp_path):
    (tmp_path / "cgroups").write_text("cpu\t1\t1\t1\n")
    assert mount_cgroups(False, root=str(tmp_path / "never"), proc_cgroups=str(tmp_path / "cgroups")) == []
    assert not (tmp_path / "never").exists()
