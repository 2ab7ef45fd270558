"""A second guest: cgroup v2, the debug console, and a crash.

Boot: ``agent.unified_cgroup_hierarchy=1 agent.debug_console``.  In order: cgroup2
with real controllers (memory OOM reported by GetOOMEvent, pids limit,
pause/resume), a shell on the serial console, and last an agent killed from
inside the guest, which must take the VM down as a failure (pvpanic → QEMU exits 1).
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from vm_harness import bind, boot, create, dump_on_failure, guest_spec, run

from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.vm

APPEND = "agent.log=debug agent.unified_cgroup_hierarchy=1 agent.debug_console"
MiB = 1 << 20


@pytest.fixture(scope="module")
def guest(vm_image, vm_workdir, request):
    vm = boot(vm_image, vm_workdir, APPEND, smp="1")
    yield vm
    dump_on_failure(vm, request)
    vm.stop()


# --- 5. cgroup v2 ---------------------------------------------------------------------------


async def test_cgroup2_is_mounted_with_real_controllers(guest):
    script = "grep ' /host-cgroup ' /proc/self/mountinfo; cat /host-cgroup/cgroup.controllers"
    async with guest.agent() as calls:
        status, out, err = await run(calls, "cg", guest_spec(script, mounts=[bind("/sys/fs/cgroup", "/host-cgroup", "ro")]))
    assert status == 0, err
    mountinfo, controllers = out.decode().splitlines()
    assert " - cgroup2 " in mountinfo
    # favordynmods (kernel >= 6.0): moving each container's init takes no RCU grace period
    assert "favordynmods" in mountinfo.split(" - ", 1)[1], mountinfo
    assert {"cpuset", "cpu", "memory", "pids"} <= set(controllers.split())
    init = next(r for r in guest.console_records() if r.get("msg") == "init")
    assert init["cgroups"] == ["/sys/fs/cgroup"]


async def test_memory_limit_oom_kills_and_get_oom_event_reports_it(guest):
    # tail keeps the whole newline-free stream in memory: 200 MiB against a 32 MiB limit
    limit = {"memory": {"limit": 32 * MiB, "swap": 32 * MiB}}
    async with guest.agent() as calls:
        oom = asyncio.ensure_future(calls.GetOOMEvent(timeout=None))
        try:
            status, _, err = await run(calls, "oom", guest_spec("head -c 200m /dev/zero | tail", resources=limit))
            assert status == 128 + signal.SIGKILL, f"not OOM-killed: status {status}, {err!r}"
            event = await asyncio.wait_for(oom, 30)
        finally:
            oom.cancel()
    assert event.container_id == "oom"


async def test_pids_limit(guest):
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 3 & done; wait; echo done"
    async with guest.agent() as calls:
        status, out, err = await run(calls, "pids", guest_spec(script, resources={"pids": {"limit": 4}}))
    assert b"can't fork" in err or b"Resource temporarily unavailable" in err, (status, out, err)


async def test_pause_and_resume(guest):
    script = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"
    async with guest.agent() as calls:
        await create(calls, "ticker", guest_spec(script))
        await calls.StartContainer(container_id="ticker")

        async def read(wait: float) -> bytes | None:
            try:
                r = await asyncio.wait_for(calls.ReadStdout(container_id="ticker", exec_id="ticker", len=65536,
                                                            timeout=None), wait)
            except TimeoutError:
                return None
            return r.data

        assert await read(20)
        await calls.PauseContainer(container_id="ticker")
        while await read(0.5):  # what was written before the freeze
            pass
        assert await read(2.0) is None, "output while paused"
        await calls.ResumeContainer(container_id="ticker")
        assert await read(10), "no output after resume"
        await calls.SignalProcess(container_id="ticker", exec_id="ticker", signal=signal.SIGKILL)
        assert (await calls.WaitProcess(container_id="ticker", exec_id="ticker")).status == 137
        await calls.RemoveContainer(container_id="ticker")


# --- 6. debug console ----------------------------------------------------------------------


async def test_debug_console_shell_on_the_serial_console(guest):
    started = [r for r in guest.console_records() if r.get("subsystem") == "debug-console"]
    console = guest.serial()
    try:
        # the echoed command line shows "$((6*7))", only the shell's answer shows 42
        console.send("\necho KAGENT$((6*7))MARK\n")
        answered = await asyncio.to_thread(console.expect, "KAGENT42MARK", 20 if started else 5)
    finally:
        console.close()
    if not answered and not started:
        pytest.xfail("agent.debug_console: nothing started a shell on the serial console "
                     "(kagent.console is not started by the agent yet)")
    assert answered, "no shell answered on the serial console"


# --- 7b. a crash ----------------------------------------------------------------------------


async def test_agent_crash_panics_the_vm_and_qemu_exits_with_failure(guest):
    # From a container in the guest's PID namespace: SIGKILL PID 1's children (the agent).
    script = "kill -KILL $(cat /proc/1/task/1/children)"
    async with guest.agent() as calls:
        await create(calls, "killer", guest_spec(script, namespaces=("mount", "ipc", "uts")))
        try:
            await calls.StartContainer(container_id="killer")
            await calls.WaitProcess(container_id="killer", exec_id="killer", timeout=30)
        except RpcError:
            pass  # the agent may die before it answers
    rc = await asyncio.to_thread(guest.wait, 60)
    assert rc == 1, f"QEMU exit status {rc}; a guest panic with pvpanic exits 1"
    assert "agent died (signal 9)" in guest.console()
    assert "Kernel panic" in guest.console()

