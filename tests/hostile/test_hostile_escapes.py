"""Ids, paths and mount destinations that try to escape: refused, or confined to the
container, through the real agent.  Escape targets are sentinel directories of the
test (never the host's /), so a failure would write there and be seen."""

from __future__ import annotations

import os

import pytest
import reliability_harness as harness

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


def snapshot(path: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        out += [os.path.join(dirpath, n) for n in dirs + files]
    return sorted(out)


@pytest.fixture
def agent():
    with harness.busybox_agent() as a:
        a.outside = os.path.join(a.workdir, "outside")
        os.makedirs(a.outside)
        with open(os.path.join(a.outside, "sentinel"), "w") as f:
            f.write("untouched\n")
        yield a


async def test_ids_that_try_to_escape_are_refused(agent):
    calls = harness.Calls(await agent.connect())
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
    run_before = os.listdir(agent.run_dir) if os.path.isdir(agent.run_dir) else []
    cgroups_before = agent.cgroups()
    for bad in ("..", ".", "../x", "/abs", "a/b", "a\x00b", "x" * 300, "-x", ".hidden", "a b",
                "ünï", "../" + agent.cgroup_parent):
        with pytest.raises(RpcError) as err:
            await calls.create(bad, spec)
        assert err.value.code == Code.INVALID_ARGUMENT, (bad, err.value)
        for rpc in ("StartContainer", "RemoveContainer", "PauseContainer", "StatsContainer"):
            with pytest.raises(RpcError) as err:
                await getattr(calls, rpc)(container_id=bad)
            assert err.value.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), (rpc, bad, err.value)
    await calls.create("c1", devtools.default_spec(agent.rootfs, ["/bin/sleep", "100"]))
    await calls.StartContainer(container_id="c1")
    for bad in ("../c1", "/x", "a/b", "a\x00b", "x" * 300):
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="c1", exec_id=bad, process=oci.process_from_dict(
                {"args": ["/bin/true"], "cwd": "/"}))
        assert err.value.code == Code.INVALID_ARGUMENT, (bad, err.value)
    await calls.RemoveContainer(container_id="c1")
    assert (os.listdir(agent.run_dir) if os.path.isdir(agent.run_dir) else []) == run_before
    assert agent.cgroups() == cgroups_before
    assert snapshot(agent.outside) == [os.path.join(agent.outside, "sentinel")]


async def test_an_id_with_a_trailing_newline_is_refused(agent):
    """Regression (fuzzing found it): "ab\\n" used to pass the id check (re.match with "$")."""
    calls = harness.Calls(await agent.connect())
    with pytest.raises(RpcError) as err:
        await calls.create("ab\n", devtools.default_spec(agent.rootfs, ["/bin/true"]))
    assert err.value.code == Code.INVALID_ARGUMENT, err.value


async def test_cgroups_path_cannot_climb_out_of_the_agents_parent(agent):
    """``..`` in linux.cgroupsPath (plain or systemd form) stays below kagent's own parent."""
    calls = harness.Calls(await agent.connect())
    roots = [os.path.dirname(d) for d in agent.cgroup_dirs()] or None
    siblings_before = {r: sorted(os.listdir(r)) for r in (roots or [])}
    for i, path in enumerate(["../../../escape", "/../../escape", "/kubepods/../../../escape",
                              "a/../../../../escape"]):
        spec = devtools.default_spec(agent.rootfs, ["/bin/true"], cgroups_path=path)
        cid = f"c{i}"
        try:
            await calls.create(cid, spec)
        except RpcError as err:
            assert err.message, (path, err)  # refused, with a reason
            continue
        tops = agent.cgroup_dirs()
        assert tops, "no cgroup made under the agent's parent"
        for top in tops:  # the container's cgroup is below the parent, wherever ".." pointed
            root = os.path.dirname(top)
            assert sorted(os.listdir(root)) == siblings_before.get(root, sorted(os.listdir(root))), path
        await calls.RemoveContainer(container_id=cid)
    for r, before in siblings_before.items():
        assert sorted(os.listdir(r)) == before


async def test_symlinks_in_the_rootfs_pointing_out_stay_inside(agent):
    """An image with links to the host (absolute and ../../..) used as mount destinations."""
    calls = harness.Calls(await agent.connect())
    rootfs = agent.rootfs
    os.symlink(agent.outside, os.path.join(rootfs, "etc", "evil"))  # absolute, to a host directory
    os.symlink("../../../../../../../../" + agent.outside.lstrip("/"), os.path.join(rootfs, "data"))
    os.symlink("/etc/evil", os.path.join(rootfs, "chain"))  # a link to a link
    src = os.path.join(agent.workdir, "src")
    os.makedirs(src)
    with open(os.path.join(src, "m"), "w") as f:
        f.write("inside\n")
    # Links resolve as if the rootfs were "/": both land on <rootfs><outside>/..., the
    # ".."s that climb past the root stop at it.
    o = agent.outside
    spec = devtools.default_spec(rootfs, ["/bin/sh", "-c",
                                          f"cat {o}/bind1/m {o}/kagent-x/m && ls {o}/t1 /t2 >/dev/null && echo ok"])
    spec["mounts"] += [
        {"destination": "/etc/evil/bind1", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/data/kagent-x", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/chain/t1", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/data/../../../../t2", "type": "tmpfs", "source": "tmpfs"},
    ]
    await calls.create("c1", spec)
    await calls.StartContainer(container_id="c1")
    out = await calls.drain("c1", "c1")
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0, out
    assert out == b"inside\ninside\nok\n"
    await calls.RemoveContainer(container_id="c1")
    assert snapshot(agent.outside) == [os.path.join(agent.outside, "sentinel")], "written outside the rootfs"
    assert not os.path.exists("/bind1") and not os.path.exists("/kagent-x") and not os.path.exists("/t2")


PROC_TRICKS = ["/proc/self/root/pwn", "/proc/self/cwd/pwn", "/proc/1/root/pwn", "/proc/thread-self/root/pwn",
               "/proc/self/fd/3/pwn", "/proc/../pwn2", "/sys/../../pwn3", "/proc/self/root/../../pwn4"]


async def test_proc_tricks_in_mount_destinations(agent):
    """After /proc is mounted in the container, /proc/<pid>/root|cwd are magic links to the
    worker's view of the host: a destination through them must not leave the rootfs."""
    calls = harness.Calls(await agent.connect())
    for dest in PROC_TRICKS:
        spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
        spec["mounts"].append({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": ["size=1k"]})
        run_before = snapshot(agent.run_dir) if os.path.isdir(agent.run_dir) else []
        try:
            await calls.create("c1", spec)
        except RpcError as err:
            assert err.message, err  # refused: with a reason
        else:
            await calls.StartContainer(container_id="c1")
            assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
            await calls.RemoveContainer(container_id="c1")
        harness.record("hostile.proc_destinations")
        for name in ("pwn", "pwn2", "pwn3", "pwn4"):
            assert not os.path.exists("/" + name), f"{dest} reached the host's /"
        # nor the run directory on the host (a cwd trick resolves there, as a path in the rootfs)
        assert (snapshot(agent.run_dir) if os.path.isdir(agent.run_dir) else []) == run_before, dest
    assert snapshot(agent.outside) == [os.path.join(agent.outside, "sentinel")]


async def test_copyfile_through_a_link_a_container_planted(tmp_path):
    """A container with its shared directory bind-mounted read-write plants a symlink there;
    the host's next CopyFile through it is refused and nothing is written where it points.
    (Sandboxed agent: its /run/kata-containers is a private tmpfs.)"""
    harness.busybox_or_skip()
    agent = harness.AgentUnderTest(sandboxed=True, log_level="info",
                                   sandbox_setup="mkdir -p /run/kata-containers/shared/containers/c1 "
                                                 "/run/fz/outside")
    try:
        rootfs = harness.make_rootfs(agent.workdir)
        await agent.wait_ready()
        calls = harness.Calls(await agent.connect())
        shared = "/run/kata-containers/shared/containers/c1"
        spec = devtools.default_spec(rootfs, ["/bin/sh", "-c",
                                              "ln -s /run/fz/outside /shared/evil && mkdir /shared/d && "
                                              "ln -s ../evil /shared/d/up"])
        spec["mounts"].append({"destination": "/shared", "type": "bind", "source": shared,
                               "options": ["rbind", "rw"]})
        await calls.create("c1", spec)
        await calls.StartContainer(container_id="c1")
        assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
        for path in (f"{shared}/evil/pwned", f"{shared}/d/up/pwned", f"{shared}/evil"):
            with pytest.raises(RpcError) as err:
                await calls.CopyFile(path=path, file_size=3, file_mode=0o100644, dir_mode=0o755,
                                     data=b"pwn", uid=0, gid=0) if not path.endswith("evil") else \
                    await calls.CopyFile(path=path + "/sub/x", file_size=1, file_mode=0o100644,
                                         dir_mode=0o755, data=b"x")
            assert err.value.code == Code.PERMISSION_DENIED and "symlink" in err.value.message, err.value
        # a file *at* a planted link's name replaces the link: written inside, not through it
        await calls.CopyFile(path=f"{shared}/evil", file_size=2, file_mode=0o100644, dir_mode=0o755,
                             data=b"ok")
        assert os.listdir(agent.inside("/run/fz/outside")) == []
        with open(agent.inside(f"{shared}/evil"), "rb") as f:
            assert f.read() == b"ok"
        await calls.RemoveContainer(container_id="c1")
        await calls.client.close()
    finally:
        rc = agent.stop()
        left = agent.cleanup()
        assert rc == 0 and left == [], (rc, left)
