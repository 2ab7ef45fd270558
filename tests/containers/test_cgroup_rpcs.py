"""Cgroup RPCs on real containers: stats, updates, pause/resume, OOM events, pids, cpuset."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from e2e import connect

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


def spec_for(rootfs: str, script: str, resources: dict | None = None, cgroups_path: str = "") -> dict:
    spec = devtools.default_spec(rootfs, ["/bin/sh", "-c", script], cgroups_path=cgroups_path)
    if resources:
        spec["linux"]["resources"] = resources
    return spec


def cgroup_file(agent, controller: str, cid: str, name: str) -> str:
    """A container's cgroup file in a v1 hierarchy (cgroupsPath defaults to the container id)."""
    path = f"/sys/fs/cgroup/{controller}/{agent.cgroup_parent}/{cid}/{name}"
    with open(path) as f:
        return f.read().strip()


async def cpu_usage(agent, cid: str) -> int:
    return int(cgroup_file(agent, "cpuacct", cid, "cpuacct.usage"))


async def test_stats_match_the_cgroup_files(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000 & sleep 1000 & wait"))
    await calls.StartContainer(container_id="c1")
    await asyncio.sleep(0.2)
    stats = (await calls.StatsContainer(container_id="c1")).cgroup_stats
    assert stats.pids_stats.current == int(cgroup_file(agent, "pids", "c1", "pids.current")) == 3
    assert stats.memory_stats.usage.usage > 0
    assert stats.memory_stats.usage.limit == int(cgroup_file(agent, "memory", "c1", "memory.limit_in_bytes"))
    assert stats.cpu_stats.cpu_usage.total_usage > 0
    await calls.RemoveContainer(container_id="c1")


async def test_update_container_changes_limits_of_a_running_container(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000", {"pids": {"limit": 50}}))
    await calls.StartContainer(container_id="c1")
    assert cgroup_file(agent, "pids", "c1", "pids.max") == "50"
    await calls.UpdateContainer(container_id="c1", resources=oci.resources_from_dict(
        {"pids": {"limit": 7}, "cpu": {"quota": 20000, "period": 100000}}))
    assert cgroup_file(agent, "pids", "c1", "pids.max") == "7"
    assert cgroup_file(agent, "cpu", "c1", "cpu.cfs_quota_us") == "20000"
    await calls.RemoveContainer(container_id="c1")


async def test_pause_stops_a_busy_loop_and_resume_restarts_it(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "while :; do :; done"))
    await calls.StartContainer(container_id="c1")
    with pytest.raises(RpcError) as err:
        await calls.ResumeContainer(container_id="c1")
    assert err.value.code == Code.FAILED_PRECONDITION
    await calls.PauseContainer(container_id="c1")
    assert cgroup_file(agent, "freezer", "c1", "freezer.state") == "FROZEN"
    before = await cpu_usage(agent, "c1")
    await asyncio.sleep(0.3)
    assert await cpu_usage(agent, "c1") == before
    await calls.ResumeContainer(container_id="c1")
    await asyncio.sleep(0.3)
    assert await cpu_usage(agent, "c1") > before
    await calls.SignalProcess(container_id="c1", exec_id="", signal=signal.SIGKILL)
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 137
    await calls.RemoveContainer(container_id="c1")


async def test_memory_limit_oom_kill_reaches_get_oom_event(agent, rootfs):
    calls = await connect(agent)
    limit = 32 << 20
    # tail buffers a "line" of /dev/zero that never ends: it grows until the OOM killer comes.
    await calls.create("c1", spec_for(rootfs, "tail /dev/zero", {"memory": {"limit": limit, "swap": limit}}))
    oom = asyncio.create_task(calls.GetOOMEvent(timeout=None))
    await calls.StartContainer(container_id="c1")
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1", timeout=30)).status == 137
    assert (await asyncio.wait_for(oom, 10)).container_id == "c1"
    await calls.RemoveContainer(container_id="c1")


async def test_pids_limit_stops_a_fork_bomb(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000", {"pids": {"limit": 10}}))
    await calls.StartContainer(container_id="c1")
    await calls.ExecProcess(container_id="c1", exec_id="bomb", process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", "while :; do sleep 100 & done"], "cwd": "/"}))
    err = await calls.read_all("c1", "bomb", "stderr")
    status = (await calls.WaitProcess(container_id="c1", exec_id="bomb", timeout=30)).status
    assert status != 0 and b"fork" in err  # the shell could not fork past the limit
    assert int(cgroup_file(agent, "pids", "c1", "pids.current")) <= 10
    assert (await calls.StatsContainer(container_id="c1")).cgroup_stats.pids_stats.limit == 10
    await calls.RemoveContainer(container_id="c1")


async def test_kill_all_reaches_processes_the_worker_never_forked(agent, rootfs):
    calls = await connect(agent)
    spec = spec_for(rootfs, "sleep 1000")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    await calls.create("c1", spec)
    await calls.StartContainer(container_id="c1")
    await calls.ExecProcess(container_id="c1", exec_id="e1", process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", "sleep 1001 & echo $!"], "cwd": "/"}))
    orphan = int((await calls.read_all("c1", "e1")).strip())
    assert (await calls.WaitProcess(container_id="c1", exec_id="e1")).status == 0
    assert os.path.exists(f"/proc/{orphan}")
    await calls.SignalProcess(container_id="c1", exec_id="", signal=signal.SIGKILL)
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 137
    for _ in range(100):
        if not os.path.exists(f"/proc/{orphan}"):
            break
        await asyncio.sleep(0.02)
    assert not os.path.exists(f"/proc/{orphan}"), "the orphan escaped kill-all"
    await calls.RemoveContainer(container_id="c1")


async def test_online_cpu_mem_pins_a_container_to_cpu_1(agent, rootfs):
    if os.cpu_count() < 2:
        pytest.skip("needs two CPUs")
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000", {"cpu": {"cpus": "1"}}))
    await calls.StartContainer(container_id="c1")
    await calls.OnlineCPUMem(nb_cpus=os.cpu_count(), cpu_only=True)
    assert cgroup_file(agent, "cpuset", "c1", "cpuset.cpus") == "1"
    with open(f"/sys/fs/cgroup/cpuset/{agent.cgroup_parent}/cpuset.cpus") as f:
        assert f.read().strip() == f"0-{os.cpu_count() - 1}"
    await calls.ExecProcess(container_id="c1", exec_id="e1", process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"], "cwd": "/"}))
    assert (await calls.read_all("c1", "e1")).split() == [b"Cpus_allowed_list:", b"1"]
    await calls.WaitProcess(container_id="c1", exec_id="e1")
    await calls.RemoveContainer(container_id="c1")


async def test_resource_rpcs_on_unknown_containers_are_not_found(agent):
    calls = await connect(agent)
    for call in (calls.StatsContainer, calls.PauseContainer, calls.ResumeContainer):
        with pytest.raises(RpcError) as err:
            await call(container_id="nope")
        assert err.value.code == Code.NOT_FOUND


async def test_online_cpu_mem_widens_the_agents_cpuset_for_later_containers(agent, rootfs):
    """As after a CPU hot-plug: the agent's cgroups were made when only CPU 0 was online.
    OnlineCPUMem widens them top-down, so a container created later can be pinned to CPU 1."""
    if os.cpu_count() < 2:
        pytest.skip("needs two CPUs")
    calls = await connect(agent)
    await calls.create("c0", spec_for(rootfs, "sleep 1000"))  # makes the agent's parent cgroup
    top = f"/sys/fs/cgroup/cpuset/{agent.cgroup_parent}"
    for path in (f"{top}/c0/cpuset.cpus", f"{top}/cpuset.cpus"):  # children first when narrowing
        with open(path, "w") as f:
            f.write("0")
    with pytest.raises(RpcError):  # not a subset of the parent's CPUs: the kernel refuses
        await calls.create("early", spec_for(rootfs, "true", {"cpu": {"cpus": "1"}}))
    await calls.OnlineCPUMem(nb_cpus=os.cpu_count(), cpu_only=True)
    with open(f"{top}/cpuset.cpus") as f:
        assert f.read().strip() == f"0-{os.cpu_count() - 1}"
    await calls.create("late", spec_for(rootfs, "grep Cpus_allowed_list /proc/self/status", {"cpu": {"cpus": "1"}}))
    await calls.StartContainer(container_id="late")
    assert (await calls.read_all("late", "late")).split() == [b"Cpus_allowed_list:", b"1"]
    await calls.WaitProcess(container_id="late", exec_id="late")
    for cid in ("late", "c0"):
        await calls.RemoveContainer(container_id=cid)


async def test_a_throttle_rule_for_a_device_the_guest_lacks_is_invalid_argument(agent, rootfs):
    """blkio refuses a rule for a device that does not exist (ENODEV): the host's mistake,
    INVALID_ARGUMENT naming the file, in CreateContainer and in UpdateContainer (make fuzz)."""
    rule = {"blockIO": {"throttleReadBpsDevice": [{"major": 0, "minor": 0, "rate": 1 << 20}]}}
    if not os.path.isdir("/sys/fs/cgroup/blkio"):
        pytest.skip("no blkio hierarchy")
    calls = await connect(agent)
    with pytest.raises(RpcError) as err:
        await calls.create("c1", spec_for(rootfs, "true", resources=rule))
    assert err.value.code == Code.INVALID_ARGUMENT and "blkio.throttle.read_bps_device" in err.value.message
    await calls.create("c2", spec_for(rootfs, "sleep 100"))
    with pytest.raises(RpcError) as err:
        await calls.UpdateContainer(container_id="c2", resources=oci.resources_from_dict(rule))
    assert err.value.code == Code.INVALID_ARGUMENT and "No such device" in err.value.message
    await calls.RemoveContainer(container_id="c2")
