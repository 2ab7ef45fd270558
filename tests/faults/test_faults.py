"""Faults: a worker killed, an init that dies during set-up, a hook that hangs, a host
that goes away mid-call, no fds left, no space left.  Each time the agent answers,
goes on, and leaves nothing behind (no worker, process, bundle, cgroup, fd or mount).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import psutil
import pytest
import reliability_harness as harness

from kagent import devtools, ipc, oci, protocols
from kagent.protocols import agent_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError
from kagent.zygote import fork_zygote

pytestmark = pytest.mark.root


Calls = harness.Calls


@pytest.fixture(scope="module")
def agent():
    with harness.busybox_agent() as a:
        yield a


def spec(agent, script: str = "echo ok") -> dict:
    return devtools.default_spec(agent.rootfs, ["/bin/sh", "-c", script])


async def works(agent, calls: Calls, cid: str = "after") -> None:
    """The agent goes on: a container runs start to end."""
    await calls.create(cid, spec(agent, "echo after"))
    await calls.StartContainer(container_id=cid)
    r = await calls.ReadStdout(container_id=cid, exec_id=cid, len=100)
    assert r.data == b"after\n"
    assert (await calls.WaitProcess(container_id=cid, exec_id=cid)).status == 0
    await calls.RemoveContainer(container_id=cid)


async def baseline(agent) -> harness.Snapshot:
    async with await agent.connect() as c:
        await works(agent, Calls(c), "warm")
    await asyncio.sleep(0.2)
    return agent.snapshot()


async def served_snapshot(agent, calls: Calls) -> harness.Snapshot:
    """A snapshot that holds the connection of ``calls``: connect() returns before the agent
    has accepted, and a baseline taken then would count the accepted socket as a leak."""
    await calls.Check()
    return agent.snapshot()


def processes_with(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


async def exec_again(calls: Calls, cid: str, exec_id: str, status: int = 0) -> None:
    """An exec under an id whose earlier exec failed: it runs, with its own output and exit."""
    await calls.ExecProcess(container_id=cid, exec_id=exec_id, process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", f"echo again; exit {status}"], "cwd": "/"}))
    assert await calls.drain(cid, exec_id) == b"again\n"
    assert (await calls.WaitProcess(container_id=cid, exec_id=exec_id)).status == status


async def gone(marker: str, timeout: float = 10) -> list[psutil.Process]:
    """Wait until no live process carries ``marker``; what is still there at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def nothing_left(agent, base: harness.Snapshot, cid: str, marker: str | None = None) -> None:
    problems = await harness.settle(agent, base, timeout=10, rss_slack=16 << 20)
    assert problems == [], problems
    assert not os.path.exists(os.path.join(agent.run_dir, cid)), "bundle left behind"
    if marker:
        assert processes_with(marker) == [], f"processes left: {processes_with(marker)}"


def worker_of(agent, cid: str, timeout: float = 5) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(agent.pid).children(recursive=True):
            try:
                if p.cmdline()[:1] == [f"kagent: worker {cid}"]:
                    return p
            except psutil.Error:  # gone, or a zombie
                continue
        time.sleep(0.02)
    raise AssertionError(f"no worker for {cid}")


# --- workers, inits and hooks ---------------------------------------------------------------


async def test_worker_killed_during_create(agent):
    """SIGKILL the worker while a prestart hook runs: CreateContainer fails promptly, and
    the container's init, the hook and the cgroup are all gone."""
    base = await baseline(agent)
    marker = "31.4159"
    s = spec(agent)
    s["hooks"] = {"prestart": [{"path": "/bin/sleep", "args": ["sleep", marker], "timeout": 60}]}
    async with await agent.connect() as c:
        calls = Calls(c)
        create = asyncio.create_task(calls.create("wk", s))
        worker = await asyncio.to_thread(worker_of, agent, "wk")
        deadline = time.monotonic() + 5
        while not processes_with(marker) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        with pytest.raises(RpcError) as err:
            await asyncio.wait_for(create, 10)
        assert err.value.code == Code.UNAVAILABLE and "worker" in err.value.message, err.value
        await works(agent, calls)
    leaked = [d for d in agent.cgroups() if "/wk " in d]
    procs = []
    for top in agent.cgroup_dirs():
        path = os.path.join(top, "wk", "cgroup.procs")
        if os.path.exists(path):
            procs += open(path).read().split()
    harness.figure("worker killed during create", cgroups_left=len(leaked), processes_left=len(set(procs)))
    await nothing_left(agent, base, "wk", marker)


async def test_init_dies_during_set_up(agent):
    """A prestart hook kills the container's init (its pid is in the state on stdin)."""
    base = await baseline(agent)
    s = spec(agent)
    killer = r"""pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); kill -9 "$pid" """
    s["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", killer], "timeout": 10}]}
    async with await agent.connect() as c:
        calls = Calls(c)
        try:
            await calls.create("dies", s)
        except RpcError as err:
            assert err.message, err  # refused with a reason
        else:  # or created with an init that is already gone: start fails, wait reports it
            with pytest.raises(RpcError):
                await calls.StartContainer(container_id="dies")
            await calls.RemoveContainer(container_id="dies")
        await works(agent, calls)
    await nothing_left(agent, base, "dies")


async def test_hook_hanging_past_its_timeout(agent):
    base = await baseline(agent)
    marker = "27.1828"
    s = spec(agent)
    s["hooks"] = {"createRuntime": [{"path": "/bin/sleep", "args": ["sleep", marker], "timeout": 1}]}
    async with await agent.connect() as c:
        calls = Calls(c)
        started = time.monotonic()
        with pytest.raises(RpcError) as err:
            await calls.create("hang", s)
        assert time.monotonic() - started < 6
        assert "timed out after 1s" in err.value.message and "createRuntime" in err.value.message, err.value
        await works(agent, calls)
    await nothing_left(agent, base, "hang", marker)


# --- the host goes away ---------------------------------------------------------------------


async def _send_and_vanish(agent, name: str, request, wait: float) -> None:
    """Send one request on a fresh connection, then close it after ``wait`` seconds."""
    reader, writer = await asyncio.open_unix_connection(agent.sock)
    m = protocols.find(name)
    from kagent.protocols import ttrpc_pb2

    body = ttrpc_pb2.Request(service=m.service, method=m.name, payload=request.SerializeToString())
    writer.write(framing.encode_frame(1, framing.TYPE_REQUEST, 0, body.SerializeToString()))
    await writer.drain()
    await asyncio.sleep(wait)
    writer.close()
    await writer.wait_closed()


async def test_host_disconnects_mid_read_and_wait_then_reconnects(agent):
    base = await baseline(agent)
    async with await agent.connect() as c:
        calls = Calls(c)
        await calls.create("rd", spec(agent, "sleep 1; echo late; exit 4"))
        await calls.StartContainer(container_id="rd")
    # a ReadStdout and a WaitProcess blocked, then the host is gone
    await _send_and_vanish(agent, "ReadStdout", agent_pb2.ReadStreamRequest(container_id="rd", exec_id="rd",
                                                                           len=100), 0.2)
    await _send_and_vanish(agent, "WaitProcess", agent_pb2.WaitProcessRequest(container_id="rd", exec_id="rd"),
                           0.2)
    async with await agent.connect() as c:  # reconnect: the state is intact
        calls = Calls(c)
        assert (await calls.ReadStdout(container_id="rd", exec_id="rd", len=100)).data == b"late\n"
        assert (await calls.WaitProcess(container_id="rd", exec_id="rd")).status == 4
        await calls.RemoveContainer(container_id="rd")
        await works(agent, calls)
    await nothing_left(agent, base, "rd")


async def test_host_disconnects_mid_create_then_reconnects(agent):
    """The container is either fully there (and usable) or not there at all."""
    base = await baseline(agent)
    s = spec(agent)
    s["hooks"] = {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "0.5"], "timeout": 10}]}
    req = agent_pb2.CreateContainerRequest(container_id="mid", exec_id="mid", OCI=oci.spec_from_dict(s))
    await _send_and_vanish(agent, "CreateContainer", req, 0.2)
    await asyncio.sleep(1.0)
    async with await agent.connect() as c:
        calls = Calls(c)
        try:
            await calls.StartContainer(container_id="mid")
        except RpcError as err:
            assert err.code == Code.NOT_FOUND, err  # not there: create again works
            await calls.create("mid", spec(agent))
            await calls.StartContainer(container_id="mid")
        assert (await calls.WaitProcess(container_id="mid", exec_id="mid")).status == 0
        await calls.RemoveContainer(container_id="mid")
        await works(agent, calls)
    await nothing_left(agent, base, "mid", "sleep 0.5")


# --- resources run out ----------------------------------------------------------------------


def _nofile(pid: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE of ``pid``."""
    out = subprocess.run(["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings", "--output=SOFT,HARD"],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


def _prlimit_nofile(pid: int, soft: int, hard: int | None = None) -> None:
    """Only ever on the agent process this test started."""
    limit = f"{soft}:{hard}" if hard is not None else f"{soft}:"
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}"], check=True)


async def test_emfile_during_set_up(agent):
    """The agent's fd limit lowered to just above what it holds, step by step, so that set-up
    runs out at every point (bundle, socketpair, received stdio fds): each CreateContainer
    fails with RESOURCE_EXHAUSTED and a message that says so (never INTERNAL: running out is
    not a bug), leaks nothing, and the agent goes on."""
    base = await baseline(agent)
    old_soft, old_hard = _nofile(agent.pid)
    outcomes = []
    async with await agent.connect() as c:
        calls = Calls(c)
        connected = await served_snapshot(agent, calls)  # the baseline plus this connection
        for room in range(0, 7):
            try:
                _prlimit_nofile(agent.pid, psutil.Process(agent.pid).num_fds() + room)
                try:
                    await calls.create("emfile", spec(agent))
                except RpcError as err:
                    outcomes.append((err.code, err.message))
                else:
                    await calls.RemoveContainer(container_id="emfile")
                    outcomes.append((Code.OK, "created"))
            finally:
                _prlimit_nofile(agent.pid, old_soft, old_hard)
            assert agent.alive()
            assert await harness.settle(agent, connected, timeout=10, rss_slack=16 << 20) == [], (room, outcomes)
        await works(agent, calls)
    harness.figure("EMFILE sweep", outcomes=len(outcomes),
                   replies_without_their_fds=sum("did not arrive" in m for _, m in outcomes))
    for code, m in outcomes:
        assert code == Code.OK or (code == Code.RESOURCE_EXHAUSTED and "ran out of file descriptors" in m), outcomes
    assert any("did not arrive" in m for _, m in outcomes), ("no reply lost its fds", outcomes)
    assert "Too many open files" not in "".join(r for r in agent.log().splitlines() if "traceback" in r)
    await nothing_left(agent, base, "emfile")


async def test_exec_at_the_fd_limit_leaves_nothing(agent):
    """ExecProcess with the agent's fd limit lowered step by step, so that the worker's reply
    loses its fds (pidfd and stdio): RESOURCE_EXHAUSTED, and the process the worker had
    started is killed and reaped (nothing runs that the host cannot wait for or signal), no
    fd leaks, and the same exec id works afterwards."""
    base = await baseline(agent)
    marker = "16.1803"
    proc = oci.process_from_dict({"args": ["/bin/sleep", marker], "cwd": "/"})
    old_soft, old_hard = _nofile(agent.pid)
    outcomes = []
    async with await agent.connect() as c:
        calls = Calls(c)
        # Not "sh -c sleep": the init's command line must not change (sh execs) after the snapshot.
        await calls.create("ex", devtools.default_spec(agent.rootfs, ["/bin/sleep", "1000"]))
        await calls.StartContainer(container_id="ex")
        running = await served_snapshot(agent, calls)  # the baseline plus this connection and the container
        for room in range(0, 6):
            try:
                _prlimit_nofile(agent.pid, psutil.Process(agent.pid).num_fds() + room)
                try:
                    await calls.ExecProcess(container_id="ex", exec_id="e", process=proc)
                except RpcError as err:
                    outcomes.append((err.code, err.message))
                else:
                    outcomes.append((Code.OK, "exec'd"))
            finally:
                _prlimit_nofile(agent.pid, old_soft, old_hard)
            if outcomes[-1][0] == Code.OK:
                await calls.SignalProcess(container_id="ex", exec_id="e", signal=signal.SIGKILL)
                assert (await calls.WaitProcess(container_id="ex", exec_id="e")).status == 128 + signal.SIGKILL
                await calls.drain("ex", "e")  # read to EOF: its stdio is then closed
                await calls.drain("ex", "e", stderr=True)
            else:
                # Gone by the time the host has its answer, not some time later.
                assert processes_with(marker) == [], (room, outcomes)
                with pytest.raises(RpcError) as err:
                    await calls.WaitProcess(container_id="ex", exec_id="e")
                assert err.value.code == Code.NOT_FOUND
            assert agent.alive()
            assert await harness.settle(agent, running, timeout=10, rss_slack=16 << 20) == [], (room, outcomes)
        # The same exec id again: a process of its own, whose exit is its own.
        await exec_again(calls, "ex", "e", status=3)
        await calls.RemoveContainer(container_id="ex")
        await works(agent, calls)
    harness.figure("ExecProcess at the fd limit", outcomes=len(outcomes),
                   replies_without_their_fds=sum("ran out of file descriptors" in m for _, m in outcomes))
    assert all(code in (Code.OK, Code.RESOURCE_EXHAUSTED) for code, _ in outcomes), outcomes
    assert any("ran out of file descriptors" in m for _, m in outcomes), ("no reply lost its fds", outcomes)
    await nothing_left(agent, base, "ex", marker)


async def test_exec_past_its_deadline_leaves_nothing(agent):
    """The worker stopped while an ExecProcess waits for it: the deadline passes, and when the
    worker goes on, the process it then starts (whose reply nobody waits for) is killed and
    reaped; the same exec id works afterwards."""
    base = await baseline(agent)
    marker = "14.1421"
    async with await agent.connect() as c:
        calls = Calls(c)
        await calls.create("late", devtools.default_spec(agent.rootfs, ["/bin/sleep", "1000"]))
        await calls.StartContainer(container_id="late")
        running = await served_snapshot(agent, calls)
        worker = worker_of(agent, "late")
        worker.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RpcError) as err:
                await calls.ExecProcess(container_id="late", exec_id="e", timeout=0.3,
                                        process=oci.process_from_dict({"args": ["/bin/sleep", marker], "cwd": "/"}))
            assert err.value.code == Code.DEADLINE_EXCEEDED, err.value
        finally:
            worker.send_signal(signal.SIGCONT)
        # The worker, going on, first starts the late exec, then is told to discard it: the
        # process may appear after the snapshot has settled, and must then go.
        assert await gone(marker) == []
        assert await harness.settle(agent, running, timeout=10, rss_slack=16 << 20) == []
        await exec_again(calls, "late", "e")
        await calls.RemoveContainer(container_id="late")
        await works(agent, calls)
    await nothing_left(agent, base, "late", marker)


async def test_rpcs_at_the_fd_limit_are_resource_exhausted_not_internal(agent):
    """RPCs that open fds (a netlink socket, a module imported on first use, cgroup and /proc
    files), at the fd limit: each answers or fails RESOURCE_EXHAUSTED "ran out of file
    descriptors" — never INTERNAL, and no traceback in the log (it is not a bug)."""
    base = await baseline(agent)
    old_soft, old_hard = _nofile(agent.pid)
    outcomes: dict[str, list] = {}
    async with await agent.connect() as c:
        calls = Calls(c)
        await calls.create("fds", devtools.default_spec(agent.rootfs, ["/bin/sleep", "1000"]))
        await calls.StartContainer(container_id="fds")
        requests = {"ListInterfaces": {}, "ListRoutes": {}, "GetMetrics": {}, "GetGuestDetails": {},
                    "StatsContainer": {"container_id": "fds"}}
        for name, fields in requests.items():
            for room in range(0, 3):
                await calls.Check()  # the connection accepted: its fd is counted below
                try:
                    _prlimit_nofile(agent.pid, psutil.Process(agent.pid).num_fds() + room)
                    try:
                        await getattr(calls, name)(**fields)
                    except RpcError as err:
                        outcomes.setdefault(name, []).append((err.code, err.message))
                    else:
                        outcomes.setdefault(name, []).append((Code.OK, ""))
                finally:
                    _prlimit_nofile(agent.pid, old_soft, old_hard)
        await calls.RemoveContainer(container_id="fds")
        await works(agent, calls)
    failed = [(name, m) for name, got in outcomes.items() for code, m in got if code != Code.OK]
    harness.figure("RPCs at the fd limit", calls=sum(map(len, outcomes.values())), out_of_fds=len(failed))
    for name, got in outcomes.items():
        for code, m in got:
            assert code == Code.OK or (code == Code.RESOURCE_EXHAUSTED and "ran out of file descriptors" in m), \
                (name, outcomes)
    assert failed, ("no RPC ran out of fds: the test did not test anything", outcomes)
    assert "Too many open files" not in "".join(r for r in agent.log().splitlines() if "traceback" in r)
    await nothing_left(agent, base, "fds")


def test_zygote_at_its_fd_limit_answers_a_spawn():
    """A spawn whose socket the zygote cannot receive (MSG_CTRUNC) is answered with an error,
    not dropped (the supervisor would wait for the reply forever); then the zygote goes on."""
    handle = fork_zygote()
    try:
        handle.sock.settimeout(10)
        assert _zygote_request(handle.sock, {"op": "ping", "id": 1})[0]["pid"] == handle.pid
        held = {int(n) for n in os.listdir(f"/proc/{handle.pid}/fd")}
        _prlimit_nofile(handle.pid, min(set(range(len(held) + 1)) - held))  # the next fd is over the limit
        mine, theirs = ipc.socketpair()
        with mine:
            reply, fds = _zygote_request(handle.sock, {"op": "spawn", "id": 2, "entry": "probe"}, [theirs.fileno()])
            theirs.close()
            assert fds == [] and reply.get("kind") == "fds" and "ran out of file descriptors" in reply["error"], reply
        _prlimit_nofile(handle.pid, 1024)
        mine, theirs = ipc.socketpair()
        with mine:
            reply, _ = _zygote_request(handle.sock, {"op": "spawn", "id": 3, "entry": "probe"}, [theirs.fileno()])
            theirs.close()
            assert ipc.recv(mine)[0]["pid"] == reply["pid"]  # the probe worker ran
    finally:
        handle.sock.close()  # EOF: the zygote exits by itself
        os.waitpid(handle.pid, 0)


def _zygote_request(sock, msg, fds=()):
    ipc.send(sock, msg, fds)
    while True:
        got = ipc.recv(sock)
        assert got is not None, "the zygote closed its socket"
        if got[0].get("reply") == msg["id"]:
            return got
        for fd in got[1]:
            os.close(fd)


async def test_accept_under_emfile_does_not_spin(agent):
    """At its fd limit the agent cannot accept: it must not burn a CPU retrying, and it
    serves the connection once an fd is free."""
    base = await baseline(agent)
    old = subprocess.run(["prlimit", f"--pid={agent.pid}", "--nofile", "--raw", "--noheadings",
                          "--output=SOFT,HARD"], check=True, capture_output=True, text=True).stdout.split()
    p = psutil.Process(agent.pid)
    log_before = agent.log().count("accept failed")
    try:
        # Well below what it holds (fds still open from an earlier step may close meanwhile):
        # no accept can succeed.
        _prlimit_nofile(agent.pid, max(8, p.num_fds() // 2))
        waiting = asyncio.create_task(agent.connect(timeout=10))
        await asyncio.sleep(0.3)
        cpu0 = sum(p.cpu_times()[:2])
        await asyncio.sleep(1.0)
        busy = sum(p.cpu_times()[:2]) - cpu0
    finally:
        _prlimit_nofile(agent.pid, int(old[0]), int(old[1]))
    client = await waiting
    await client.close()
    warnings = agent.log().count("accept failed") - log_before
    harness.figure("accept at the fd limit", agent_cpu_seconds_per_second=round(busy, 2),
                   accept_warnings=warnings)
    assert warnings >= 1, "the agent never hit the limit: the test did not test anything"
    assert busy < 0.5 and warnings < 50, f"{busy:.2f}s of CPU and {warnings} warnings in 1.3s retrying accept()"
    assert await harness.settle(agent, base, rss_slack=16 << 20) == []


async def test_enospc_during_set_up(tmp_path):
    """The run directory on a full filesystem: CreateContainer fails with a clear error and
    leaves no half-written bundle; once there is room again it works."""
    harness.busybox_or_skip()
    agent = harness.AgentUnderTest(
        sandboxed=True, log_level="info", env={"KAGENT_RUN_DIR": "/run/tiny/run"},
        sandbox_setup="mkdir -p /run/tiny && mount -t tmpfs -o size=256k tiny /run/tiny && "
                      "mkdir /run/tiny/run && (cat /dev/zero > /run/tiny/fill 2>/dev/null || true)")
    try:
        rootfs = harness.make_rootfs(agent.workdir)
        await agent.wait_ready()
        async with await agent.connect() as c:
            calls = Calls(c)
            with pytest.raises(RpcError) as err:
                await calls.create("full", devtools.default_spec(rootfs, ["/bin/true"]))
            assert "No space left on device" in err.value.message, err.value
            assert os.listdir(agent.inside("/run/tiny/run")) == []
            os.unlink(agent.inside("/run/tiny/fill"))
            await calls.create("full", devtools.default_spec(rootfs, ["/bin/true"]))
            await calls.StartContainer(container_id="full")
            assert (await calls.WaitProcess(container_id="full", exec_id="full")).status == 0
            await calls.RemoveContainer(container_id="full")
            assert os.listdir(agent.inside("/run/tiny/run")) == []
    finally:
        rc = agent.stop()
        left = agent.cleanup()
        assert rc == 0 and left == [], (rc, left)
