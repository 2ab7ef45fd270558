"""Fuzz target: every RPC's payload through the real handlers of a running, sandboxed agent.

One kagent process for the module, started in namespaces of its own (see
reliability_harness: read-only /, /sys and /proc/sys; tmpfs /run and fake
/sys/devices/system/{cpu,memory}; /dev/random a plain file; no CAP_SYS_TIME,
CAP_SYS_MODULE or CAP_SYS_BOOT), with a running container "fz" so that requests
naming it reach deep code.  For each of the 44 methods (less the excluded ones,
rpc_strategies.EXCLUDED), batches of random bytes, random messages and mutated
valid requests are sent concurrently; requests that could act on this machine
are constrained first (rpc_strategies.CONSTRAINED).

Properties: every request gets a status (long-polls end with DEADLINE_EXCEEDED,
the deadline each request carries); the agent stays alive; at the end its fds,
children, threads, mounts, cgroups and run directory are back to the baseline
taken after a warm-up.  An INTERNAL status (a handler raised something that is
not a domain error) is recorded as a finding, not a failure.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import reliability_harness as harness
import rpc_strategies as rs
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from kagent import oci, protocols
from kagent.protocols import agent_pb2
from kagent.ttrpc.codes import Code

pytestmark = pytest.mark.root

# Two methods change what every later request meets, so they are fuzzed on their own:
# DestroySandbox ends the agent (as upstream's does) and goes last; SetPolicy can install a
# policy that refuses everything (SetPolicy included), so it gets an agent of its own.
ON_THEIR_OWN = ("DestroySandbox", "SetPolicy")
METHODS = sorted((m for m in protocols.methods().values() if m.name not in rs.EXCLUDED
                  and m.name not in ON_THEIR_OWN), key=lambda m: (m.service, m.name))
# Deadlines carried by the requests: long enough for real work, short for long-polls.
SLOW = {"CreateContainer": 15.0, "RemoveContainer": 15.0, "StartContainer": 10.0, "ExecProcess": 10.0,
        "UpdateContainer": 5.0, "DestroySandbox": 15.0, "CreateSandbox": 10.0, "SetIPTables": 5.0,
        "GetIPTables": 5.0, "GetMetrics": 5.0}
DEFAULT_DEADLINE = 0.5
EXAMPLES_CI = 6


def cid_of(name: str, payload: bytes) -> str | None:
    if name != "CreateContainer":
        return None
    try:
        return agent_pb2.CreateContainerRequest.FromString(payload).container_id
    except Exception:
        return None


class Fuzzer:
    def __init__(self, agent: harness.AgentUnderTest, env: rs.Env) -> None:
        self.agent = agent
        self.env = env
        self.codes: dict[str, dict[str, int]] = {}

    def run(self, coro, timeout: float = 120):
        return uvloop.run(asyncio.wait_for(coro, timeout))

    async def call(self, client: harness.RawClient, name: str, payload: bytes) -> tuple[int, str, bytes]:
        m = protocols.find(name)
        return await client.call(m.service, m.name, payload, timeout=SLOW.get(name, DEFAULT_DEADLINE))

    async def batch(self, name: str, payloads: list[bytes]) -> None:
        client = await harness.RawClient.connect(self.agent.sock)
        try:
            results = await asyncio.gather(*(self.call(client, name, p) for p in payloads),
                                           return_exceptions=True)
            for payload, res in zip(payloads, results, strict=True):
                if isinstance(res, BaseException):
                    if not self.agent.alive():
                        pytest.fail(f"the agent died during {name}:\n{self.agent.log_tail()}")
                    raise AssertionError(f"{name}({payload!r}): {res!r}\n{self.agent.log_tail(3000)}") from res
                code, message, body = res
                assert 0 <= code <= 16, (name, code, message)
                self.codes.setdefault(name, {}).setdefault(Code(code).name, 0)
                self.codes[name][Code(code).name] += 1
                if code == Code.OK:
                    protocols.find(name).response.FromString(body)  # a well-formed answer
                elif code == Code.INTERNAL:
                    harness.finding(f"{name}: INTERNAL: {message[:200]}")
            # containers this batch created: removed again (their leftovers are checked at the end)
            for cid in {cid_of(name, p) for p in payloads} - {None, "fz"}:
                await client.call("grpc.AgentService", "RemoveContainer",
                                  agent_pb2.RemoveContainerRequest(container_id=cid).SerializeToString(),
                                  timeout=15)
        finally:
            await client.close()
        assert self.agent.alive(), f"the agent died during {name}:\n{self.agent.log_tail()}"

    async def ensure_fz(self) -> None:
        """Container "fz" exists and runs (a fuzzed request may have removed or killed it)."""
        async with await self.agent.connect() as c:
            calls = Calls(c)
            try:
                await calls.ExecProcess(container_id="fz", exec_id="probe", process=oci.process_from_dict(
                    {"args": ["/bin/true"], "cwd": "/"}))
                await calls.WaitProcess(container_id="fz", exec_id="probe")
                return
            except Exception:
                pass
            try:
                await calls.RemoveContainer(container_id="fz", timeout=15)
            except Exception:
                pass
            await calls.CreateContainer(container_id="fz", exec_id="fz", OCI=oci.spec_from_dict(
                rs.spec_dict(self.env, ["/bin/sleep", "100000"])), timeout=30)
            await calls.StartContainer(container_id="fz")


Calls = harness.Calls


def _prepare(workdir: str) -> rs.Env:
    env = rs.Env(rootfs=harness.make_rootfs(workdir), workdir=workdir)
    os.makedirs(env.binds)
    with open(os.path.join(env.binds, "file"), "w") as f:
        f.write("bind me\n")
    os.makedirs(os.path.join(env.swapdir, "dir"))
    with open(os.path.join(env.swapdir, "notswap"), "wb") as f:
        f.write(b"\0" * 8192)  # a page of zeros: no mkswap signature
    os.mkfifo(os.path.join(env.swapdir, "fifo"))
    return env


@pytest.fixture(scope="module")
def fuzzer():
    harness.busybox_or_skip()
    agent = harness.AgentUnderTest(sandboxed=True, cmdline="agent.hotplug_timeout=0.2s", log_level="info")
    try:
        env = _prepare(agent.workdir)
        fz = Fuzzer(agent, env)
        fz.run(agent.wait_ready())
        fz.run(fz.ensure_fz())
        # warm-up: every method once with an empty request (thread pools, netlink sockets, ...)
        fz.run(fz.batch("GetMetrics", [b""]))
        for m in METHODS:
            fz.run(fz.batch(m.name, [b""]))
        fz.run(fz.ensure_fz())
        fz.run(asyncio.sleep(0.5))
        fz.baseline = agent.snapshot()
        yield fz
    finally:
        rc = agent.stop()
        left = agent.cleanup()
        assert rc == 0, f"kagent exited with {rc}"
        assert left == [], f"cgroups left behind: {left}"


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_rpc_payloads_always_get_a_status(fuzzer, method):
    name = method.name
    fuzzer.run(fuzzer.ensure_fz())

    @harness.fuzz_settings(EXAMPLES_CI, long=400)
    @given(batch=st.lists(rs.payloads(name, fuzzer.env), min_size=1, max_size=4))
    def run(batch):
        harness.record(f"rpc.{name}", len(batch))
        fuzzer.run(fuzzer.batch(name, batch))

    run()


def test_the_agent_is_back_to_its_baseline(fuzzer):
    """After every method's examples: nothing leaked in the agent, nothing left on disk."""
    fuzzer.run(fuzzer.ensure_fz())
    problems = fuzzer.run(harness.settle(fuzzer.agent, fuzzer.baseline, timeout=15,
                                         rss_slack=64 << 20))
    after = fuzzer.agent.snapshot()
    harness.figure("rpc fuzz agent", fds=f"{len(fuzzer.baseline.fds)}->{len(after.fds)}",
                   rss_mib=f"{fuzzer.baseline.rss >> 20}->{after.rss >> 20}",
                   threads=f"{fuzzer.baseline.threads}->{after.threads}")
    if harness.MODE == "long" or os.environ.get("KAGENT_RELIABILITY_REPORT"):
        for name, codes in sorted(fuzzer.codes.items()):
            harness.figure(f"rpc codes {name}", **codes)
    assert problems == [], problems
    assert "fz" in os.listdir(fuzzer.agent.run_dir)
    assert [d for d in os.listdir(fuzzer.agent.run_dir) if d not in ("fz", "sandbox")] == [], \
        "bundles left behind"
    # nothing outside the sandbox's writable places was created by the fuzzed requests
    for base in (fuzzer.env.swapdir,):
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                assert stat.S_ISREG(os.lstat(os.path.join(dirpath, f)).st_mode) or f == "fifo"


def test_destroy_sandbox_answers_then_the_agent_stops_cleanly(fuzzer):
    """Last: DestroySandbox (a mutated one) is answered, then the agent ends with status 0,
    its containers gone (the module fixture checks the cgroups)."""
    async def destroy():
        client = await harness.RawClient.connect(fuzzer.agent.sock)
        try:
            # an unknown field (1, length 0): still a valid DestroySandboxRequest
            return await client.call("grpc.AgentService", "DestroySandbox", b"\x0a\x00", timeout=20)
        finally:
            await client.close()

    code, message, _ = fuzzer.run(destroy())
    harness.record("rpc.DestroySandbox")
    assert code == Code.OK, message
    fuzzer.agent.proc.wait(30)
    assert fuzzer.agent.proc.returncode == 0, fuzzer.agent.log_tail()


def test_set_policy_payloads_always_get_a_status():
    """SetPolicy on an agent of its own: whatever policy a payload installs (one refusing
    everything included), every request gets a status and grpc.Health (never policed) still
    answers; the agent stops cleanly."""
    agent = harness.AgentUnderTest(sandboxed=True, log_level="info")
    try:
        fz = Fuzzer(agent, rs.Env(rootfs="/nonexistent", workdir=agent.workdir))
        fz.run(agent.wait_ready())

        async def health() -> None:
            client = await harness.RawClient.connect(agent.sock)
            try:
                code, message, _ = await client.call("grpc.Health", "Check", b"", timeout=5)
                assert code == Code.OK, message
            finally:
                await client.close()

        @harness.fuzz_settings(15, long=400)
        @given(batch=st.lists(rs.payloads("SetPolicy", fz.env), min_size=1, max_size=3))
        def run(batch):
            harness.record("rpc.SetPolicy", len(batch))
            fz.run(fz.batch("SetPolicy", batch))
            fz.run(health())

        run()
        for name, codes in fz.codes.items():
            if harness.MODE == "long" or os.environ.get("KAGENT_RELIABILITY_REPORT"):
                harness.figure(f"rpc codes {name}", **codes)
    finally:
        rc = agent.stop()
        left = agent.cleanup()
    assert rc == 0 and left == [], (rc, left)
