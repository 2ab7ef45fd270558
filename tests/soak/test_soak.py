"""Soak: thousands of exec/wait cycles and hundreds of create/remove cycles, several at a
time, each with its stdio in use (stdin written and closed, stdout and stderr read to
EOF), then the agent's fds, threads, children, mounts and cgroups must be back to their
baseline and its RSS within a small margin.

The normal suite runs a short version (240 execs, 16 containers: a few seconds);
``make soak`` (KAGENT_SOAK=long) runs 10000 exec and 600 create cycles
($KAGENT_SOAK_EXECS and $KAGENT_SOAK_CREATES override the counts).
The figures are printed at the end of the run (and written to
$KAGENT_RELIABILITY_REPORT).
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
import reliability_harness as harness

from kagent import devtools, oci

pytestmark = pytest.mark.root

PARALLEL = 4
LONG = harness.MODE == "long"
EXEC_CYCLES = int(os.environ.get("KAGENT_SOAK_EXECS", 10_000 if LONG else 240))
CREATE_CYCLES = int(os.environ.get("KAGENT_SOAK_CREATES", 600 if LONG else 16))
RSS_SLACK = (48 if LONG else 24) << 20


Calls = harness.Calls


async def drain(calls: Calls, cid: str, exec_id: str, stderr: bool = False) -> bytes:
    return await calls.drain(cid, exec_id, stderr)


class Sampler:
    """Peak fds, RSS and threads of the agent while the soak runs."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.fds = self.rss = self.threads = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.fds = max(self.fds, self.proc.num_fds())
            self.rss = max(self.rss, self.proc.memory_info().rss)
            self.threads = max(self.threads, self.proc.num_threads())
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


async def exec_cycle(calls: Calls, worker: int, i: int) -> None:
    exec_id = f"x{worker}-{i}"
    payload = os.urandom(512 + (i % 7) * 600).hex().encode()
    await calls.ExecProcess(container_id="soak", exec_id=exec_id, process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", "cat; echo done >&2; exit 7"], "cwd": "/", "env": ["PATH=/bin"]}))

    async def feed() -> None:
        await calls.WriteStdin(container_id="soak", exec_id=exec_id, data=payload)
        await calls.CloseStdin(container_id="soak", exec_id=exec_id)

    _, out, err, status = await asyncio.gather(
        feed(), drain(calls, "soak", exec_id), drain(calls, "soak", exec_id, stderr=True),
        calls.WaitProcess(container_id="soak", exec_id=exec_id))
    assert (out, err, status.status) == (payload, b"done\n", 7), (exec_id, len(out), err, status)


async def create_cycle(calls: Calls, rootfs: str, worker: int, i: int) -> None:
    cid = f"c{worker}-{i}"
    spec = devtools.default_spec(rootfs, ["/bin/sh", "-c", "head -c 100000 /dev/zero; echo e >&2"])
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 32}}
    await calls.CreateContainer(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec))
    await calls.StartContainer(container_id=cid)
    out, err, status = await asyncio.gather(drain(calls, cid, cid), drain(calls, cid, cid, stderr=True),
                                            calls.WaitProcess(container_id=cid, exec_id=cid))
    assert (len(out), err, status.status) == (100000, b"e\n", 0), cid
    await calls.RemoveContainer(container_id=cid)


@pytest.fixture(scope="module")
def agent():
    with harness.busybox_agent() as a:
        yield a


async def test_soak_exec_and_create_cycles_return_to_baseline(agent):
    clients = [await agent.connect() for _ in range(PARALLEL)]
    calls = [Calls(c) for c in clients]
    try:
        # warm-up: one of each, so that pools and caches exist before the baseline
        await create_cycle(calls[0], agent.rootfs, 0, 0)
        spec = devtools.default_spec(agent.rootfs, ["/bin/sleep", "1000000"])
        await calls[0].CreateContainer(container_id="soak", exec_id="soak", OCI=oci.spec_from_dict(spec))
        await calls[0].StartContainer(container_id="soak")
        for _ in range(3):  # concurrently on every connection: pools of pipes and buffers fill
            await asyncio.gather(*(exec_cycle(calls[w], w, 0) for w in range(PARALLEL)))
        await asyncio.sleep(0.3)
        base = agent.snapshot()
        sampler = Sampler(agent.pid)

        started = time.monotonic()
        per = EXEC_CYCLES // PARALLEL
        await asyncio.gather(*(_loop(exec_cycle, calls[w], w, 1, per + 1) for w in range(PARALLEL)))
        exec_seconds = time.monotonic() - started
        mid = await harness.settle(agent, base, timeout=10, rss_slack=RSS_SLACK)
        rss_after_exec = agent.snapshot().rss

        started = time.monotonic()
        per_c = CREATE_CYCLES // PARALLEL
        await asyncio.gather(*(_loop(lambda c, w, i: create_cycle(c, agent.rootfs, w, i), calls[w], w, 1,
                                     per_c + 1) for w in range(PARALLEL)))
        create_seconds = time.monotonic() - started
        await sampler.stop()
        problems = await harness.settle(agent, base, timeout=15, rss_slack=RSS_SLACK)
        after = agent.snapshot()
        harness.figure(
            f"soak ({harness.MODE})",
            exec_cycles=per * PARALLEL, exec_per_s=round(per * PARALLEL / exec_seconds, 1),
            create_cycles=per_c * PARALLEL, create_per_s=round(per_c * PARALLEL / create_seconds, 1),
            parallel=PARALLEL,
            fds=f"{len(base.fds)}->{len(after.fds)} (peak {sampler.fds})",
            rss_mib=f"{base.rss / 2**20:.1f}->{rss_after_exec / 2**20:.1f}->{after.rss / 2**20:.1f} "
                    f"(peak {sampler.rss / 2**20:.1f})",
            threads=f"{base.threads}->{after.threads} (peak {sampler.threads})",
            children=len(after.children), mounts_same=after.mounts == base.mounts,
            cgroups=f"{len(base.cgroups)}->{len(after.cgroups)}")
        assert mid == [], mid
        assert problems == [], problems
        await calls[0].RemoveContainer(container_id="soak")
    finally:
        for c in clients:
            await c.close()


async def _loop(cycle, calls: Calls, worker: int, first: int, end: int) -> None:
    for i in range(first, end):
        await cycle(calls, worker, i)
