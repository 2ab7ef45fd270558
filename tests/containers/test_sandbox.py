"""A pod as the host runtime starts it (reference §1.3 step 1): CreateSandbox, then its
containers sharing the pod's namespaces, DNS and storages; DestroySandbox at the end."""

from __future__ import annotations

import asyncio
import os

import pytest
from e2e import connect

from kagent import devtools, oci
from kagent.protocols import agent_pb2
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


def spec_for(rootfs: str, script: str, mounts: list[dict] | None = None) -> dict:
    spec = devtools.default_spec(rootfs, ["/bin/sh", "-c", script])
    spec["mounts"] += mounts or []
    return spec


async def run_to_end(calls, cid: str) -> tuple[int, bytes]:
    await calls.StartContainer(container_id=cid)
    out = await calls.read_all(cid, cid)
    status = (await calls.WaitProcess(container_id=cid, exec_id=cid)).status
    return status, out


async def test_pod_start_sequence_shares_namespaces_dns_and_storage(agent, rootfs):
    calls = await connect(agent)
    shm = os.path.join(agent.run_dir, "sandbox", "shm")
    resolv = os.path.join(agent.workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.53\n")
    assert (await calls.Check()).status == 1
    await calls.CreateSandbox(
        hostname="mypod", sandbox_id="pod1", dns=["nameserver 10.96.0.10", " search svc.cluster.local "],
        storages=[agent_pb2.Storage(driver="ephemeral", source="shm", fstype="tmpfs", mount_point=shm,
                                    options=["noexec", "nosuid", "nodev", "mode=1777", "size=1048576"])])
    details = await calls.GetGuestDetails(mem_block_size=True, mem_hotplug_probe=True)
    assert "ephemeral" in details.agent_details.storage_handlers

    # the pause container: first, its pid namespace becomes the pod's
    await calls.create("pod1", spec_for(rootfs, "sleep 1000"))
    await calls.StartContainer(container_id="pod1")

    volume = {"destination": "/shm", "type": "bind", "source": shm, "options": ["rbind", "rw"]}
    dns = {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}
    script = ("hostname; readlink /proc/self/ns/ipc; cat /etc/resolv.conf; echo hello > /shm/greeting; "
              "ps -o comm | grep -c '^sleep'")
    await calls.CreateContainer(container_id="app", exec_id="app", sandbox_pidns=True,
                                OCI=oci.spec_from_dict(spec_for(rootfs, script, [volume, dns])))
    status, out = await run_to_end(calls, "app")
    lines = out.decode().splitlines()
    assert status == 0, out
    assert lines[0] == "mypod"  # the pod's UTS namespace, not the container's own hostname
    assert lines[2:4] == ["nameserver 10.96.0.10", "search svc.cluster.local"]
    assert lines[-1] == "1"  # the pause container's sleep, seen through the shared pid ns
    ipc_app = lines[1]

    await calls.create("app2", spec_for(rootfs, "cat /shm/greeting; readlink /proc/self/ns/ipc", [volume]))
    status, out = await run_to_end(calls, "app2")
    assert status == 0 and out.decode().splitlines() == ["hello", ipc_app]

    for cid in ("app", "app2"):
        await calls.RemoveContainer(container_id=cid)
    await calls.SignalProcess(container_id="pod1", exec_id="", signal=9)
    await calls.WaitProcess(container_id="pod1", exec_id="pod1")
    await calls.RemoveContainer(container_id="pod1")
    await calls.DestroySandbox()
    for _ in range(100):  # DestroySandbox stops the agent once its reply is out
        if agent.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert agent.proc.returncode == 0


async def test_create_sandbox_twice_and_unknown_storage_driver(agent, rootfs):
    calls = await connect(agent)
    await calls.CreateSandbox(hostname="p", sandbox_id="p")
    with pytest.raises(RpcError) as err:
        await calls.CreateSandbox(hostname="p", sandbox_id="p")
    assert err.value.code == Code.ALREADY_EXISTS
    with pytest.raises(RpcError) as err:
        await calls.CreateContainer(container_id="c1", exec_id="c1", OCI=oci.spec_from_dict(spec_for(rootfs, "true")),
                                    storages=[agent_pb2.Storage(driver="floppy", source="a", mount_point="/x")])
    assert err.value.code == Code.INVALID_ARGUMENT and "floppy" in err.value.message
    assert not os.path.exists(os.path.join(agent.run_dir, "c1"))
    await calls.DestroySandbox()


async def test_sandbox_pidns_without_a_first_container_is_refused(agent, rootfs):
    calls = await connect(agent)
    await calls.CreateSandbox(hostname="p", sandbox_id="p", sandbox_pidns=True)
    await calls.create("first", spec_for(rootfs, "true"))
    await run_to_end(calls, "first")  # the first container has exited
    with pytest.raises(RpcError) as err:
        await calls.create("second", spec_for(rootfs, "true"))
    assert err.value.code == Code.FAILED_PRECONDITION and "first container" in err.value.message
    await calls.RemoveContainer(container_id="first")
