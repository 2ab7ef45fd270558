"""A real guest, booted once for this module: kagent as PID 1, driven from the host.

Boot: ``agent.log=debug agent.hotplug_timeout=10s agent.container_pipe_size=1048576``,
one CPU of two.  In order: boot facts, the sandbox, containers and their stdio,
disk hot-plug (device and blk storage), CPU hot-plug, and last DestroySandbox,
which powers the VM off.  Features other parts of kagent do not have yet end in
xfail naming the UNIMPLEMENTED RPC.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from vm_harness import (
    bind,
    boot,
    create,
    dump_on_failure,
    guest_spec,
    read_all,
    run,
    xfail_if_unimplemented,
)

import kagent
from kagent import oci
from kagent.protocols import agent_pb2, health_pb2
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.vm

APPEND = "agent.log=debug agent.hotplug_timeout=10s agent.container_pipe_size=1048576"
HOTPLUG_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def guest(vm_image, vm_workdir, request):
    vm = boot(vm_image, vm_workdir, APPEND, smp="1,maxcpus=2")
    yield vm
    dump_on_failure(vm, request)
    vm.stop()


def disk_image(workdir: str, name: str, files: dict[str, str]) -> str:
    """An ext4 image holding ``files``, made without mounting (mke2fs -d)."""
    src = os.path.join(workdir, name + ".d")
    os.makedirs(src, exist_ok=True)
    for rel, text in files.items():
        with open(os.path.join(src, rel), "w") as f:
            f.write(text)
    path = os.path.join(workdir, name + ".img")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", src, path, "16M"], check=True,
                   capture_output=True)
    return path


def plug_disk(vm, node: str, path: str, slot: int) -> None:
    vm.qmp.execute("blockdev-add", **{"node-name": node, "driver": "raw",
                                      "file": {"driver": "file", "filename": path}})
    vm.qmp.execute("device_add", driver="virtio-blk-pci", id=f"dev-{node}", drive=node, addr=f"{slot:#x}")


# --- 1. boot ------------------------------------------------------------------------------------


async def test_boot_check_and_facts(guest):
    async with guest.agent() as calls:
        assert (await calls.Check()).status == 1  # SERVING
        details = await calls.GetGuestDetails(mem_block_size=True, mem_hotplug_probe=True)
    print(f"boot to Check: {guest.boot_seconds:.1f}s")
    assert guest.boot_seconds < 60
    assert details.agent_details.version == kagent.__version__
    assert details.mem_block_size_bytes > 0
    records = guest.console_records()
    init = next(r for r in records if r.get("msg") == "init")
    assert init["pid"] == 1
    for mount_point in ("/proc", "/sys", "/dev", "/dev/shm", "/dev/pts", "/run"):
        assert mount_point in init["mounted"]
    assert {"virtio_pci", "virtio_console", "virtio_blk", "pvpanic_mmio"} <= set(init["modules"])
    assert init["hostname"] == "kagent-vm" and init["console"] is True
    assert init["cgroups"], "no cgroup hierarchy mounted"
    assert not [r for r in records if r.get("subsystem") == "init" and r.get("level") == "warning"]
    ready = next(r for r in records if r.get("msg") == "kagent ready")
    assert ready["address"] == "serial://agent.channel.0" and ready["pid"] != 1
    # agent.log=debug took effect, and no option on the command line was refused
    assert any(r.get("level") == "debug" for r in records)
    assert not [r for r in records if r.get("msg") == "configuration"]


async def test_guest_details_report_init_daemon(guest):
    async with guest.agent() as calls:
        details = await calls.GetGuestDetails()
    if not details.agent_details.init_daemon:
        pytest.xfail("GetGuestDetails.init_daemon is False: kagent/guest.py still tests getpid() == 1, "
                     "but the supervisor is PID 1's child (use kagent.init.is_init_mode())")


async def test_serial_reconnects(guest):
    """The host runtime reconnects to the agent's port; no first request may be lost.

    A virtio-serial port discards the input it holds when the guest closes it, so the
    agent keeps the port open from one host connection to the next (a request that
    arrived between the old host's EOF and the port's closing used to be lost)."""
    lost = 0
    for _ in range(20):
        client = await Client.connect("unix://" + guest.agent_sock, timeout=10)
        try:
            await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                              health_pb2.HealthCheckResponse, timeout=5)
        except RpcError as exc:
            if exc.code != Code.DEADLINE_EXCEEDED:
                raise
            lost += 1
        finally:
            await client.close()
    lost += guest.lost_probes
    assert lost == 0, f"{lost} request(s) lost on a fresh connection to the agent's serial port"


# --- 2. sandbox and containers -----------------------------------------------------------------


async def test_create_sandbox_hostname_dns_and_ephemeral_storage(guest):
    scratch = "/run/kata-containers/sandbox/ephemeral/scratch"
    async with guest.agent() as calls:
        try:
            await calls.CreateSandbox(
                sandbox_id="vmpod", hostname="pod-vm", dns=["nameserver 192.0.2.53"],
                storages=[agent_pb2.Storage(driver="ephemeral", source="tmpfs", fstype="tmpfs",
                                            mount_point=scratch)])
        except RpcError as exc:
            xfail_if_unimplemented(exc, "CreateSandbox")
            raise
        # containers share the sandbox's UTS namespace (its hostname) and the guest's DNS
        spec = guest_spec("hostname; cat /etc/resolv.conf; echo; grep ' /scratch ' /proc/self/mountinfo",
                          mounts=[bind("/etc/resolv.conf", "/etc/resolv.conf", "ro"), bind(scratch, "/scratch")])
        status, out, err = await run(calls, "sbx-check", spec)
    assert status == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "pod-vm"
    assert "nameserver 192.0.2.53" in lines
    assert " - tmpfs " in lines[-1]


async def test_container_output_stdin_exec_and_exit_codes(guest):
    async with guest.agent() as calls:
        script = "echo out; echo err >&2; read line; echo got:$line; exit 3"
        await create(calls, "c1", guest_spec(script))
        await calls.StartContainer(container_id="c1")
        await calls.WriteStdin(container_id="c1", exec_id="c1", data=b"ping\n")
        await calls.CloseStdin(container_id="c1", exec_id="c1")
        out, err, status = await asyncio.gather(
            read_all(calls, "c1", "c1"), read_all(calls, "c1", "c1", "stderr"),
            calls.WaitProcess(container_id="c1", exec_id="c1"))
        assert (out, err, status.status) == (b"out\ngot:ping\n", b"err\n", 3)
        await calls.RemoveContainer(container_id="c1")

        await create(calls, "c2", guest_spec("sleep 1000"))
        await calls.StartContainer(container_id="c2")
        await calls.ExecProcess(container_id="c2", exec_id="e1", process=oci.process_from_dict(
            {"args": ["/bin/sh", "-c", "echo exec in $$; exit 7"], "cwd": "/", "env": ["PATH=/bin"]}))
        assert (await read_all(calls, "c2", "e1")).startswith(b"exec in ")
        assert (await calls.WaitProcess(container_id="c2", exec_id="e1")).status == 7
        await calls.SignalProcess(container_id="c2", exec_id="c2", signal=signal.SIGKILL)
        assert (await calls.WaitProcess(container_id="c2", exec_id="c2")).status == 128 + signal.SIGKILL
        await calls.RemoveContainer(container_id="c2")


async def test_container_pipe_size_from_the_command_line(guest):
    # 1 000 000 bytes fit in a 1 MiB pipe: the writer finishes (and says so on stderr)
    # while nobody reads stdout.  With the default 64 KiB pipe it would block.
    async with guest.agent() as calls:
        await create(calls, "pipe", guest_spec("head -c 1000000 /dev/zero; echo written >&2"))
        await calls.StartContainer(container_id="pipe")
        err = await asyncio.wait_for(read_all(calls, "pipe", "pipe", "stderr"), 30)
        assert err == b"written\n"
        assert len(await read_all(calls, "pipe", "pipe")) == 1_000_000
        assert (await calls.WaitProcess(container_id="pipe", exec_id="pipe")).status == 0
        await calls.RemoveContainer(container_id="pipe")


# --- 3. disk hot-plug ----------------------------------------------------------------------------


async def test_hotplugged_disk_appears_in_the_guest(guest, vm_workdir):
    path = disk_image(vm_workdir, "disk1", {"hello.txt": "one\n"})
    async with guest.agent() as calls:
        watch = "for i in $(seq 1 200); do grep -q ' vda$' /proc/partitions && exit 0; sleep 0.1; done; exit 1"
        await create(calls, "watch", guest_spec(watch))
        await calls.StartContainer(container_id="watch")
        t0 = time.monotonic()
        plug_disk(guest, "d1", path, slot=5)
        status = await calls.WaitProcess(container_id="watch", exec_id="watch")
        print(f"virtio-blk disk visible in the guest {time.monotonic() - t0:.2f}s after device_add")
        assert status.status == 0, "vda never appeared in /proc/partitions"
        await calls.RemoveContainer(container_id="watch")


async def test_blk_storage_waits_for_the_hotplug_then_times_out_for_a_missing_one(guest, vm_workdir):
    path = disk_image(vm_workdir, "disk2", {"hello.txt": "hello from the host\n"})
    mount_point = "/run/kata-containers/sandbox/storage/disk2"
    storage = agent_pb2.Storage(driver="blk", source="06", fstype="ext4", mount_point=mount_point)
    spec = guest_spec("cat /data/hello.txt", mounts=[bind(mount_point, "/data", "ro")])
    async with guest.agent() as calls:
        creating = asyncio.ensure_future(create(calls, "blk1", spec, storages=[storage]))
        await asyncio.sleep(1.0)
        if creating.done() and creating.exception() is not None:
            xfail_if_unimplemented(creating.exception(), "CreateContainer with a blk storage")
            raise creating.exception()
        assert not creating.done(), "CreateContainer did not wait for the disk"
        plug_disk(guest, "d2", path, slot=6)
        await creating
        await calls.StartContainer(container_id="blk1")
        out = await read_all(calls, "blk1", "blk1")
        assert (await calls.WaitProcess(container_id="blk1", exec_id="blk1")).status == 0
        assert out == b"hello from the host\n"
        await calls.RemoveContainer(container_id="blk1")

        never = agent_pb2.Storage(driver="blk", source="07", fstype="ext4",
                                  mount_point="/run/kata-containers/sandbox/storage/never")
        t0 = time.monotonic()
        with pytest.raises(RpcError) as err:
            await create(calls, "blk2", guest_spec("true"), storages=[never])
        elapsed = time.monotonic() - t0
    assert HOTPLUG_TIMEOUT - 0.5 <= elapsed <= HOTPLUG_TIMEOUT + 15, elapsed
    assert "07" in err.value.message or "time" in err.value.message.lower(), err.value.message


# --- 4. CPU hot-plug -------------------------------------------------------------------------------


async def test_cpu_hotplug_online_and_pinned_container(guest):
    free = [c for c in guest.qmp.execute("query-hotpluggable-cpus") if "qom-path" not in c]
    assert free, "no hot-pluggable CPU slot (boot with -smp 1,maxcpus=2)"
    cpu = free[0]
    guest.qmp.execute("device_add", driver=cpu["type"], id="cpu-hot1", **cpu["props"])
    async with guest.agent() as calls:
        try:
            await calls.OnlineCPUMem(nb_cpus=2, cpu_only=True, wait=True)
        except RpcError as exc:
            xfail_if_unimplemented(exc, "OnlineCPUMem")
            raise
        status, out, err = await run(calls, "online", guest_spec("cat /sys/devices/system/cpu/online"))
        assert (status, out) == (0, b"0-1\n"), err
        spec = guest_spec("grep Cpus_allowed_list /proc/self/status", resources={"cpu": {"cpus": "1"}})
        try:
            status, out, err = await run(calls, "pinned", spec)
        except RpcError as exc:
            if "cpuset.cpus" in exc.message and "Permission denied" in exc.message:
                # v1 refuses (EACCES) a cpuset that is not a subset of its parent's
                pytest.xfail("the cpuset rule: OnlineCPUMem onlined CPU 1, but the containers' parent "
                             f"cgroup was not widened top-down first: {exc.message}")
            raise
    assert status == 0, err
    assert out.split() == [b"Cpus_allowed_list:", b"1"]


# --- 7a. the end -------------------------------------------------------------------------------------


async def test_destroy_sandbox_powers_the_vm_off(guest):
    async with guest.agent() as calls:
        try:
            await calls.DestroySandbox(timeout=30)
        except RpcError as exc:
            xfail_if_unimplemented(exc, "DestroySandbox")
            if exc.code != Code.UNAVAILABLE:  # the connection may drop as the VM goes down
                raise
    rc = await asyncio.to_thread(guest.wait, 60)
    assert rc == 0, f"QEMU exit status {rc} (0 is a clean power-off)"
    assert "agent exited: powering off" in guest.console()
