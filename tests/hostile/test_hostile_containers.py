"""Containers that abuse the agent: flooding output nobody reads, forking to their pids
limit, allocating until the OOM killer comes, holding their pipes open after exit.
Each time the agent's memory and fds stay bounded, another container keeps working,
and removal gives everything back."""

from __future__ import annotations

import asyncio
import signal

import psutil
import pytest
import reliability_harness as harness

from kagent import devtools, oci
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agent():
    with harness.busybox_agent() as a:
        yield a


def spec(agent, script: str, **resources) -> dict:
    s = devtools.default_spec(agent.rootfs, ["/bin/sh", "-c", script])
    s["linux"]["resources"] = {"pids": {"limit": 64}, "memory": {"limit": 128 << 20}, **resources}
    return s


async def another_container_works(calls: harness.Calls, agent, cid: str) -> None:
    """A bystander: created, run, read, waited and removed while the abuse goes on."""
    await calls.create(cid, spec(agent, "echo bystander; exit 5"))
    await calls.StartContainer(container_id=cid)
    out = await calls.drain(cid, cid)
    assert out == b"bystander\n"
    assert (await calls.WaitProcess(container_id=cid, exec_id=cid)).status == 5
    await calls.RemoveContainer(container_id=cid)


async def baseline(agent, calls: harness.Calls) -> harness.Snapshot:
    await another_container_works(calls, agent, "warm")
    await asyncio.sleep(0.2)
    return agent.snapshot()


def watch(agent, seconds: float) -> tuple[int, int]:
    """(max RSS, max fds) of the agent sampled over ``seconds``."""
    p = psutil.Process(agent.pid)
    rss = fds = 0
    for _ in range(int(seconds / 0.1)):
        rss = max(rss, p.memory_info().rss)
        fds = max(fds, p.num_fds())
        import time

        time.sleep(0.1)
    return rss, fds


async def test_flood_with_nobody_reading(agent):
    calls = harness.Calls(await agent.connect())
    base = await baseline(agent, calls)
    await calls.create("flood", spec(agent, "yes stdout-flood & yes stderr-flood >&2 & wait"))
    await calls.StartContainer(container_id="flood")
    rss, fds = await asyncio.to_thread(watch, agent, 1.5)
    await another_container_works(calls, agent, "b1")
    harness.figure("flood, nobody reading", agent_rss_growth_kib=(rss - base.rss) >> 10,
                   agent_fds=f"{len(base.fds)}->{fds}")
    assert rss - base.rss < 8 << 20, "the agent buffered a container's output"
    r = await calls.ReadStdout(container_id="flood", exec_id="flood", len=100)
    assert r.data.startswith(b"stdout-flood")
    await calls.RemoveContainer(container_id="flood")
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []


async def test_fork_bomb_stops_at_its_pids_limit(agent):
    calls = harness.Calls(await agent.connect())
    base = await baseline(agent, calls)
    await calls.create("bomb", spec(agent, "b() { b | b & }; b; sleep 1000", pids={"limit": 32}))
    await calls.StartContainer(container_id="bomb")
    await asyncio.sleep(1.0)
    stats = await calls.StatsContainer(container_id="bomb")
    assert stats.cgroup_stats.pids_stats.current <= 32
    await another_container_works(calls, agent, "b2")
    # the agent's own process count did not grow: only the container's cgroup is full
    assert psutil.Process(agent.pid).num_threads() <= base.threads + 8
    harness.figure("fork bomb", pids_current=stats.cgroup_stats.pids_stats.current, pids_limit=32)
    await calls.RemoveContainer(container_id="bomb", timeout=20)
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []


async def test_allocation_until_oom(agent):
    calls = harness.Calls(await agent.connect())
    base = await baseline(agent, calls)
    oom = asyncio.create_task(calls.GetOOMEvent(timeout=90))
    await calls.create("hog", spec(agent, "exec dd if=/dev/zero of=/dev/null bs=64M count=1",
                                   memory={"limit": 16 << 20, "swap": 16 << 20}))
    await calls.StartContainer(container_id="hog")
    status = (await calls.WaitProcess(container_id="hog", exec_id="hog", timeout=90)).status
    assert status == 128 + signal.SIGKILL, status
    assert (await oom).container_id == "hog"
    await another_container_works(calls, agent, "b3")
    harness.figure("OOM", status=status, agent_rss_mib=psutil.Process(agent.pid).memory_info().rss >> 20)
    await calls.RemoveContainer(container_id="hog")
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []


async def test_pipes_held_open_after_exit(agent):
    """The init exits, daemonised children keep stdout/stderr open: reads end (drain
    window), WaitProcess returns, and removal closes every fd the agent held."""
    calls = harness.Calls(await agent.connect())
    base = await baseline(agent, calls)
    for i in range(5):
        s = spec(agent, "echo first; (sleep 1000 &) ; (sleep 1000 >&2 &); exit 0")
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "pid"]
        await calls.create(f"h{i}", s)
        await calls.StartContainer(container_id=f"h{i}")
    for i in range(5):
        assert (await calls.WaitProcess(container_id=f"h{i}", exec_id=f"h{i}")).status == 0
        assert await calls.drain(f"h{i}", f"h{i}") == b"first\n"
    await another_container_works(calls, agent, "b4")
    for i in range(5):
        await calls.RemoveContainer(container_id=f"h{i}")
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []


async def test_exec_storm_on_a_busy_container(agent):
    """Many execs at once, each printing, with nobody reading some of them."""
    calls = harness.Calls(await agent.connect())
    base = await baseline(agent, calls)
    await calls.create("busy", spec(agent, "sleep 1000"))
    await calls.StartContainer(container_id="busy")

    async def one(i: int) -> None:
        await calls.ExecProcess(container_id="busy", exec_id=f"e{i}", process=oci.process_from_dict(
            {"args": ["/bin/sh", "-c", f"head -c {i * 1000} /dev/zero"], "cwd": "/"}))
        if i % 2:
            assert len(await calls.drain("busy", f"e{i}")) == i * 1000
        assert (await calls.WaitProcess(container_id="busy", exec_id=f"e{i}")).status == 0

    await asyncio.gather(*(one(i) for i in range(40)))
    await calls.RemoveContainer(container_id="busy")
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []
    with pytest.raises(RpcError):
        await calls.ReadStdout(container_id="busy", exec_id="e0", len=10)
