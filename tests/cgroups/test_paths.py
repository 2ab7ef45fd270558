"""Layout detection from mountinfo, and container cgroup paths (table-driven)."""

from __future__ import annotations

import pytest

from kagent.cgroups.paths import Layout, ancestors, container_path, detect, systemd_path
from kagent.errors import FailedPrecondition, InvalidArgument

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_COMOUNTED = """\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
30 25 0:26 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,pids
"""
V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
NONE = "22 1 0:5 / / rw - ext4 /dev/vda rw\n"


def test_detect():
    assert detect(HYBRID) == "hybrid"
    assert detect(V1_COMOUNTED) == "v1"
    assert detect(V2) == "v2"
    with pytest.raises(FailedPrecondition, match="no cgroup hierarchy"):
        detect(NONE)


def test_layout_maps_controllers_to_their_hierarchy():
    hybrid = Layout.discover(HYBRID)
    assert hybrid.driver == "v1" and hybrid.unified == "/sys/fs/cgroup/unified"
    assert hybrid.v1 == {"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpuacct",
                         "cpuset": "/sys/fs/cgroup/cpuset", "memory": "/sys/fs/cgroup/memory"}
    co = Layout.discover(V1_COMOUNTED)
    assert co.v1["cpu"] == co.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert co.v1_dirs("k/c1")["pids"] == "/sys/fs/cgroup/pids/k/c1"
    v2 = Layout.discover(V2)
    assert (v2.mode, v2.driver, v2.v1, v2.unified) == ("v2", "v2", {}, "/sys/fs/cgroup")


def test_this_machine():
    assert detect() in ("v1", "v2", "hybrid")


@pytest.mark.parametrize("given, want", [
    ("/kubepods/pod1/c1", "kagent/kubepods/pod1/c1"),
    ("kubepods/pod1/c1", "kagent/kubepods/pod1/c1"),
    ("/kubepods//pod1/./c1/", "kagent/kubepods/pod1/c1"),
    ("/../../etc", "kagent/etc"),
    ("a/../../../../b", "kagent/b"),
    ("..", "kagent/cid"),
    ("", "kagent/cid"),
    ("/", "kagent/cid"),
    ("system.slice:kata_agent:123", "kagent/system.slice/kata_agent-123.scope"),
    ("kubepods-besteffort-pod1.slice:cri-containerd:abc",
     "kagent/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"),
    (":cri:abc", "kagent/system.slice/cri-abc.scope"),
    ("-.slice::abc", "kagent/abc.scope"),
    ("a.slice:p:b.slice", "kagent/a.slice/b.slice"),
])
def test_container_path(given, want):
    assert container_path(given, "kagent", "cid") == want


def test_container_path_nested_parent_and_escapes():
    assert container_path("/x", "/agent/../kagent/sub/", "c") == "kagent/sub/x"
    for bad_parent in ("", "/", "..", "/../"):
        with pytest.raises(InvalidArgument, match="must not be the hierarchy root"):
            container_path("/x", bad_parent, "c")
    with pytest.raises(InvalidArgument, match="NUL"):
        container_path("/x\0y", "kagent", "c")
    with pytest.raises(InvalidArgument, match="container id"):
        container_path("", "kagent", "")
    with pytest.raises(InvalidArgument, match="container id"):
        container_path("", "kagent", "a/b")


@pytest.mark.parametrize("bad", ["system:p:n", "a/b.slice:p:n", "a--b.slice:p:n", "a:b"])
def test_systemd_path_rejects(bad):
    with pytest.raises(InvalidArgument):
        systemd_path(bad)


def test_ancestors():
    assert ancestors("kagent/pod/c1", "kagent") == ["kagent", "kagent/pod"]
    assert ancestors("kagent/c1", "kagent") == ["kagent"]
    assert ancestors("a/b/pod/c", "a/b") == ["a/b", "a/b/pod"]
    with pytest.raises(InvalidArgument, match="not under"):
        ancestors("other/c", "kagent")
