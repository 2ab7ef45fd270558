"""CreateSandbox's set-up (kagent.podsetup): persistent IPC/UTS namespaces, DNS, kernel
modules, guest hooks, sandbox storages, and the teardown — mounts happen in a private
mount namespace (storage_harness), /etc/resolv.conf is a file under the test's tmp dir.

modprobe is not installed on these machines: the "modprobe" the tests run is a small
shell script standing in for it (the missing-modprobe case uses the real absence).
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from storage_harness import mounted, run_in_mount_ns, storage

from kagent.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from kagent.podsetup import (
    PodSetup,
    append_hooks,
    join_sandbox_namespaces,
    modprobe_argv,
    resolv_conf_text,
    scan_hooks,
)
from kagent.protocols import agent_pb2
from kagent.storage import StorageManager

HOSTNAME = "kagent-test-pod"


def request(**kw) -> agent_pb2.CreateSandboxRequest:
    kw.setdefault("sandbox_id", "sb1")
    return agent_pb2.CreateSandboxRequest(**kw)


def setup_for(tmp: str, **kw) -> tuple[PodSetup, StorageManager]:
    pod = PodSetup(run_dir=f"{tmp}/run", resolv_conf=f"{tmp}/etc/resolv.conf", **kw)
    return pod, StorageManager(run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch")


def in_ns(path_kind: str, ns_path: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--{path_kind}={ns_path}", *argv], check=True,
                          capture_output=True, text=True).stdout.strip()


# --- namespaces -------------------------------------------------------------------------------


@pytest.mark.root
def test_persistent_namespaces(tmp_path) -> None:
    tmp = str(tmp_path)
    own_hostname = socket.gethostname()

    async def body():
        pod, storages = setup_for(tmp)
        await pod.create(request(hostname=HOSTNAME), storages)
        ns_dir = f"{tmp}/run/sandbox/ns"
        assert (pod.ipc_ns_path, pod.uts_ns_path) == (f"{ns_dir}/ipc", f"{ns_dir}/uts")
        for kind in ("ipc", "uts"):
            path = f"{ns_dir}/{kind}"
            assert mounted(path)[-1].fstype == "nsfs"
            ino = os.stat(path).st_ino
            assert ino != os.stat(f"/proc/self/ns/{kind}").st_ino  # a new one, not ours
            assert in_ns(kind, path, "readlink", f"/proc/self/ns/{kind}") == f"{kind}:[{ino}]"
        # a process that joins the UTS namespace sees the pod's hostname; we keep ours
        assert in_ns("uts", pod.uts_ns_path, "uname", "-n") == HOSTNAME
        assert socket.gethostname() == own_hostname
        await pod.destroy()
        assert not os.path.exists(ns_dir) and not mounted(f"{ns_dir}/uts")
        assert pod.ipc_ns_path is None and not pod.created

    run_in_mount_ns(body, roots=[tmp])
    assert socket.gethostname() == own_hostname


@pytest.mark.root
def test_create_twice_and_bad_hostname(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        pod, storages = setup_for(tmp)
        with pytest.raises(InvalidArgument, match="hostname"):
            await pod.create(request(hostname="h" * 65), storages)
        assert not pod.created
        await pod.create(request(hostname=HOSTNAME), storages)
        with pytest.raises(AlreadyExists):
            await pod.create(request(hostname=HOSTNAME), storages)
        await pod.destroy()

    run_in_mount_ns(body, roots=[tmp])


# --- DNS --------------------------------------------------------------------------------------


def test_resolv_conf_text() -> None:
    assert resolv_conf_text([" nameserver 10.96.0.10 ", "search default.svc.cluster.local\n",
                             "options ndots:5"]) == \
        "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"


@pytest.mark.root
def test_dns_bound_over_resolv_conf(tmp_path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1\n")

    async def body():
        pod, storages = setup_for(tmp)
        await pod.create(request(hostname=HOSTNAME, dns=["nameserver 10.96.0.10 ", " search svc"]),
                         storages)
        want = "nameserver 10.96.0.10\nsearch svc\n"
        with open(f"{tmp}/etc/resolv.conf") as f:
            assert f.read() == want
        with open(f"{tmp}/run/sandbox/resolv.conf") as f:
            assert f.read() == want
        assert mounted(f"{tmp}/etc/resolv.conf")
        await pod.destroy()
        with open(f"{tmp}/etc/resolv.conf") as f:
            assert f.read() == "nameserver 192.0.2.1\n"  # the guest's own again
        assert not os.path.exists(f"{tmp}/run/sandbox")

    run_in_mount_ns(body, roots=[tmp])


@pytest.mark.root
def test_dns_target_missing_or_directory(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        pod, storages = setup_for(tmp)
        await pod.create(request(dns=["nameserver 10.0.0.1"]), storages)  # no resolv.conf: nothing
        assert not os.path.exists(f"{tmp}/run/sandbox/resolv.conf")
        await pod.destroy()
        os.makedirs(f"{tmp}/etc/resolv.conf")
        with pytest.raises(FailedPrecondition, match="is a directory"):
            await pod.create(request(hostname=HOSTNAME, dns=["nameserver 10.0.0.1"]), storages)
        # everything created before the failure is undone
        assert not pod.created and not os.path.exists(f"{tmp}/run/sandbox/ns")

    run_in_mount_ns(body, roots=[tmp])


# --- storages ---------------------------------------------------------------------------------


@pytest.mark.root
def test_sandbox_storages(tmp_path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "share").mkdir()

    async def body():
        pod, storages = setup_for(tmp)
        shm = f"{tmp}/run/sandbox/shm"
        shared = f"{tmp}/run/shared/containers"
        got = await pod.create(request(storages=[
            storage("bind", shared + "/", source=f"{tmp}/share"),
            storage("ephemeral", shm, source="shm", fstype="tmpfs",
                    options=["noexec", "nosuid", "nodev", "mode=1777", "size=65536"]),
        ]), storages)
        assert got == [shared, shm]
        assert mounted(shared) and mounted(shm)[-1].fstype == "tmpfs"
        await pod.destroy()  # drops the sandbox's references: the bind goes, shm stays...
        assert not mounted(shared) and mounted(shm)
        assert await storages.destroy_all() == []  # ...until the sandbox's end
        assert not mounted(shm)

    run_in_mount_ns(body, roots=[tmp])


@pytest.mark.root
def test_failed_storage_undoes_the_namespaces(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        pod, storages = setup_for(tmp)
        with pytest.raises(InvalidArgument, match="'nope'"):
            await pod.create(request(hostname=HOSTNAME, storages=[storage("nope", f"{tmp}/x")]), storages)
        assert not os.path.exists(f"{tmp}/run/sandbox/ns") and not pod.created

    run_in_mount_ns(body, roots=[tmp])


# --- kernel modules ---------------------------------------------------------------------------


def fake_modprobe(tmp_path, script: str) -> str:
    path = tmp_path / "modprobe"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def module(name: str, *params: str) -> agent_pb2.KernelModule:
    return agent_pb2.KernelModule(name=name, parameters=list(params))


@pytest.mark.root
def test_modprobe_loads_with_parameters(tmp_path) -> None:
    tmp = str(tmp_path)
    tool = fake_modprobe(tmp_path, f'echo "$@" >> {tmp}/calls\necho "insmod /lib/modules/$2.ko"\n')

    async def body():
        pod, storages = setup_for(tmp, modprobe=tool)
        await pod.create(request(kernel_modules=[module("virtio_fs"), module("nvme", "io_queue_depth=64")]),
                         storages)
        await pod.destroy()

    run_in_mount_ns(body, roots=[tmp])
    assert (tmp_path / "calls").read_text() == "-v virtio_fs\n-v nvme io_queue_depth=64\n"


@pytest.mark.root
def test_modprobe_failure_and_absence(tmp_path) -> None:
    tmp = str(tmp_path)
    failing = fake_modprobe(tmp_path, 'echo "modprobe: FATAL: Module $2 not found in directory" >&2\nexit 1\n')

    async def body():
        pod, storages = setup_for(tmp, modprobe=failing)
        with pytest.raises(FailedPrecondition, match=r"no_such_mod .*exit status 1.*Module no_such_mod not found"):
            await pod.create(request(kernel_modules=[module("no_such_mod")]), storages)
        assert not pod.created
        pod, storages = setup_for(tmp, modprobe=f"{tmp}/bin/modprobe")
        with pytest.raises(FailedPrecondition, match="modprobe not found"):
            await pod.create(request(kernel_modules=[module("virtio_fs")]), storages)

    run_in_mount_ns(body, roots=[tmp])


def test_modprobe_argv() -> None:
    assert modprobe_argv("/sbin/modprobe", "m", ["a=1"]) == ["/sbin/modprobe", "-v", "m", "a=1"]
    for name, params in (("", []), ("-r", []), ("m", ["--force"])):
        with pytest.raises(InvalidArgument):
            modprobe_argv("/sbin/modprobe", name, params)


# --- guest hooks and container specs ----------------------------------------------------------


def test_scan_hooks(tmp_path) -> None:
    pre = tmp_path / "prestart"
    pre.mkdir()
    for name, mode in (("20-b", 0o755), ("10-a", 0o700), ("30-not-exec", 0o644)):
        (pre / name).write_text("#!/bin/sh\n")
        (pre / name).chmod(mode)
    os.symlink("10-a", pre / "40-link")
    (pre / "50-dir").mkdir()
    (tmp_path / "poststop").mkdir()
    (tmp_path / "poststop" / "x").write_text("")
    (tmp_path / "poststop" / "x").chmod(0o755)
    hooks = scan_hooks(str(tmp_path))
    assert hooks == {
        "prestart": [{"path": str(pre / "10-a"), "args": ["10-a", "prestart"]},
                     {"path": str(pre / "20-b"), "args": ["20-b", "prestart"]}],
        "poststop": [{"path": str(tmp_path / "poststop" / "x"), "args": ["x", "poststop"]}],
    }
    assert scan_hooks(str(tmp_path / "missing")) == {}


def test_container_spec_joins_the_sandbox() -> None:
    spec = {"hostname": "ctr", "hooks": {"prestart": [{"path": "/own"}]},
            "linux": {"namespaces": [{"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                                     {"type": "pid"}]}}
    join_sandbox_namespaces(spec, ipc="/ns/ipc", uts="/ns/uts", pid="/proc/42/ns/pid")
    assert spec["linux"]["namespaces"] == [{"type": "ipc", "path": "/ns/ipc"},
                                           {"type": "uts", "path": "/ns/uts"},
                                           {"type": "mount"}, {"type": "pid", "path": "/proc/42/ns/pid"}]
    assert "hostname" not in spec  # it would rename the whole pod
    guest = {"prestart": [{"path": "/g/prestart/a", "args": ["a", "prestart"]}]}
    append_hooks(spec, guest)
    assert [h["path"] for h in spec["hooks"]["prestart"]] == ["/own", "/g/prestart/a"]
    # without a sandbox pid namespace the spec's own pid entry stays
    spec = {"linux": {"namespaces": [{"type": "pid"}]}}
    assert join_sandbox_namespaces(spec, ipc=None, uts=None)["linux"]["namespaces"] == [{"type": "pid"}]


@pytest.mark.root
def test_guest_hooks_from_create(tmp_path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "hooks" / "poststart").mkdir(parents=True)
    hook = tmp_path / "hooks" / "poststart" / "notify"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)

    async def body():
        pod, storages = setup_for(tmp)
        await pod.create(request(guest_hook_path=f"{tmp}/hooks"), storages)
        spec = pod.container_spec({"linux": {"namespaces": [{"type": "uts"}]}})
        await pod.destroy()
        return spec

    spec = run_in_mount_ns(body, roots=[tmp])
    assert spec["hooks"] == {"poststart": [{"path": str(hook), "args": ["notify", "poststart"]}]}
    assert spec["linux"]["namespaces"] == [{"type": "uts", "path": f"{tmp}/run/sandbox/ns/uts"}]
