"""Shared machinery of the reliability tests (tests/fuzz, hostile, faults, soak).

- ``AgentUnderTest``: a real kagent process on a unix socket, with its own run
  directory and a ``kagent-test-*`` cgroup parent; optionally *sandboxed*: started
  in fresh mount, network, UTS and IPC namespaces where / , /sys and /proc/sys are
  read-only, /run, /sys/devices/system/{cpu,memory} are throwaway tmpfs, /dev/random
  is a regular file, and the capabilities that act on the whole machine
  (CAP_SYS_TIME, CAP_SYS_MODULE, CAP_SYS_BOOT) are out of its bounding set.  The
  RPC fuzzer sends arbitrary requests to that one only.
- ``Snapshot``: the agent's fds, RSS, threads, children, mounts and cgroups, to
  compare with a baseline.
- ``RawClient``: ttRPC requests with raw payloads and our own deadline, so that
  "no answer" can be told from "an error status".
- ``record`` / ``figure``: executions per fuzz target and soak figures, printed at
  the end of the run (and written as JSON to $KAGENT_RELIABILITY_REPORT).

The other test folders import this module by putting tests/fuzz on sys.path in
their conftest (test helper modules need unique names: there is one of this).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from kagent import devtools, oci, protocols
from kagent.protocols import ttrpc_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.client import Client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: "long" (make fuzz / make soak) or "ci" (the normal suite: short, deterministic)
MODE = "long" if os.environ.get("KAGENT_FUZZ") == "long" or os.environ.get("KAGENT_SOAK") == "long" else "ci"


def budget(ci: int, long: int | None = None) -> int:
    """Examples (or cycles) for a target: ``ci`` in the normal suite; in long mode
    $KAGENT_FUZZ_EXAMPLES if set, else ``long`` (default 50 x ci)."""
    if MODE != "long":
        return ci
    env = os.environ.get("KAGENT_FUZZ_EXAMPLES")
    if env:
        return max(1, int(env))
    return long if long is not None else ci * 50


_COMMON_SETTINGS = dict(deadline=None, print_blob=True,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.filter_too_much,
                                               HealthCheck.function_scoped_fixture])
settings.register_profile("kagent-ci", derandomize=True, database=None, **_COMMON_SETTINGS)
settings.register_profile(
    "kagent-fuzz", derandomize=False,
    database=DirectoryBasedExampleDatabase(os.path.expanduser("~/.cache/kagent-fuzz")), **_COMMON_SETTINGS)


def fuzz_settings(ci: int, long: int | None = None, **kw) -> settings:
    """Settings for one fuzz target: ``budget(ci, long)`` examples on the mode's profile."""
    parent = settings.get_profile("kagent-fuzz" if MODE == "long" else "kagent-ci")
    return settings(parent=parent, max_examples=budget(ci, long), **kw)


# --- executions and figures ------------------------------------------------------------------

EXECUTIONS: collections.Counter[str] = collections.Counter()
FINDINGS: list[str] = []
FIGURES: dict[str, dict] = {}
_reported = False


def record(target: str, n: int = 1) -> None:
    EXECUTIONS[target] += n


def finding(text: str) -> None:
    if text not in FINDINGS:
        FINDINGS.append(text)


def figure(name: str, **values) -> None:
    FIGURES.setdefault(name, {}).update(values)


def print_report(terminalreporter) -> None:
    """Once per run: executions per target, findings, soak figures."""
    global _reported
    if _reported or not (EXECUTIONS or FIGURES or FINDINGS):
        return
    _reported = True
    tr = terminalreporter
    if EXECUTIONS:
        tr.section(f"fuzz executions ({MODE} mode)")
        for target, n in sorted(EXECUTIONS.items()):
            tr.line(f"  {target:<58} {n:>9}")
        tr.line(f"  {'total':<58} {sum(EXECUTIONS.values()):>9}")
    if FINDINGS:
        tr.section("fuzz findings (non-fatal: statuses that look like bugs)")
        for text in FINDINGS:
            tr.line(f"  - {text}")
    if FIGURES:
        tr.section("reliability figures")
        for name, values in sorted(FIGURES.items()):
            tr.line(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    path = os.environ.get("KAGENT_RELIABILITY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"mode": MODE, "executions": dict(EXECUTIONS), "findings": FINDINGS,
                       "figures": FIGURES}, f, indent=2, sort_keys=True)
        tr.line(f"  written to {path}")


# --- a busybox rootfs --------------------------------------------------------------------------


def busybox_or_skip() -> None:
    import pytest

    if devtools.find_busybox() is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")


def make_rootfs(parent: str) -> str:
    os.chmod(parent, 0o755)
    return devtools.build_busybox_rootfs(os.path.join(parent, "rootfs"))


def run(coro):
    """Run a coroutine to its end on a uvloop loop of its own (module fixtures are not async)."""
    import uvloop

    return uvloop.run(coro)


@contextlib.contextmanager
def busybox_agent(**kw):
    """An AgentUnderTest (``kw`` as its own) with a busybox rootfs in its workdir
    (``.rootfs``); at the end it must stop cleanly and leave nothing behind."""
    busybox_or_skip()
    a = AgentUnderTest(**{"log_level": "info", **kw})
    a.rootfs = make_rootfs(a.workdir)
    try:
        yield a
    finally:
        rc = a.stop()
        left = a.cleanup()
        assert rc == 0 and left == [], (rc, left)


# --- the agent ---------------------------------------------------------------------------------

# Runs as root in the fresh namespaces, then execs the agent without the capabilities that
# change the machine as a whole.  The mount namespace is private (unshare --propagation).
_SANDBOX_SH = r"""
set -e
W="$1"; shift
mount -t tmpfs -o size=64m,mode=755 kagent-sandbox-run /run
mkdir -p /run/kata-containers /run/fz/src
for d in cpu memory; do mount -t tmpfs -o size=1m,mode=755 kagent-sandbox-$d /sys/devices/system/$d; done
echo 0-1 > /sys/devices/system/cpu/online
: > "$W/random"; mount --bind "$W/random" /dev/random
mount --bind "$W" "$W"
mount -o remount,bind,ro /
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys
eval "$KAGENT_SANDBOX_SETUP"
exec setpriv --bounding-set -sys_time,-sys_module,-sys_boot -- "$@"
"""

# Stand-ins for the tools an RPC may run on a path it resolved (resize2fs on a volume's
# device, modprobe for kernel_modules): first on the sandboxed agent's PATH.
_FAKE_TOOLS = ("resize2fs", "xfs_growfs", "modprobe", "mkswap")
CAP_SYS_TIME = 25
CAP_SYS_MODULE = 16
CAP_SYS_BOOT = 22


class AgentUnderTest:
    """A kagent process; ``sandboxed`` puts it in namespaces of its own (see the module doc)."""

    def __init__(self, *, sandboxed: bool = False, cmdline: str = "", log_level: str = "debug",
                 workdir: str | None = None, env: dict | None = None, sandbox_setup: str = "") -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="kag-", dir="/tmp")
        os.chmod(self.workdir, 0o755)
        self.sandboxed = sandboxed
        self.cgroup_parent = f"kagent-test-{uuid.uuid4().hex[:12]}"
        self.sock = os.path.join(self.workdir, "agent.sock")
        self.addr = "unix://" + self.sock
        self.run_dir = os.path.join(self.workdir, "run")
        self.cmdline_path = os.path.join(self.workdir, "cmdline")
        with open(self.cmdline_path, "w") as f:
            f.write(f"quiet {cmdline} agent.cgroup_parent={self.cgroup_parent}\n")
        self.log_path = os.path.join(self.workdir, "agent.log")
        argv = [sys.executable, "-m", "kagent", "--cmdline-file", self.cmdline_path,
                "--server-addr", self.addr, "--log-level", log_level]
        run_env = {**os.environ, "KAGENT_RUN_DIR": self.run_dir, **(env or {})}
        if sandboxed:
            bindir = os.path.join(self.workdir, "bin")
            os.makedirs(bindir)
            for tool in _FAKE_TOOLS:
                path = os.path.join(bindir, tool)
                with open(path, "w") as f:
                    f.write(f"#!/bin/sh\necho 'fake {tool} (fuzz sandbox)' >&2\nexit 1\n")
                os.chmod(path, 0o755)
            run_env["PATH"] = bindir + ":" + run_env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            run_env["KAGENT_SANDBOX_SETUP"] = sandbox_setup  # more shell, run in the namespaces
            argv = ["unshare", "--mount", "--net", "--uts", "--ipc", "--propagation", "private", "--",
                    "sh", "-c", _SANDBOX_SH, "sandbox", self.workdir, *argv]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO, env=run_env)
        log.close()
        self.pid = self.proc.pid  # unshare, sh and setpriv all exec: this is the agent

    # -- state -------------------------------------------------------------------------

    def inside(self, path: str) -> str:
        """``path`` as the agent sees it (through /proc/<pid>/root: its own mounts)."""
        return f"/proc/{self.pid}/root{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    async def connect(self, timeout: float = 20) -> Client:
        return await Client.connect(self.addr, timeout=timeout)

    async def wait_ready(self, timeout: float = 20) -> None:
        """Connected once, and (sandboxed) the capability drop verified."""
        client = await self.connect(timeout)
        await client.close()
        if self.sandboxed:
            bounding = _cap_bounding(self.pid)
            for cap in (CAP_SYS_TIME, CAP_SYS_MODULE, CAP_SYS_BOOT):
                if bounding & (1 << cap):
                    self.stop()
                    raise RuntimeError(f"sandboxed agent still has capability {cap}: refusing to fuzz it")

    def cgroup_dirs(self) -> list[str]:
        """This agent's top-level cgroup in every mounted hierarchy that has it."""
        found = []
        for root in _cgroup_roots():
            d = os.path.join(root, self.cgroup_parent)
            if os.path.isdir(d):
                found.append(d)
        return found

    def cgroups(self) -> list[str]:
        """Every cgroup below this agent's parent, relative to the hierarchy."""
        out = []
        for top in self.cgroup_dirs():
            root = os.path.dirname(top)
            for dirpath, _dirs, _files in os.walk(top):
                if dirpath != top:
                    out.append(os.path.relpath(dirpath, root) + f" ({os.path.basename(root)})")
        return sorted(out)

    def snapshot(self) -> Snapshot:
        return Snapshot.of(self)

    # -- end ----------------------------------------------------------------------------

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> list[str]:
        """After stop: remove what a failed test may have left; returns the cgroups that were left."""
        left = self.cgroups()
        for top in self.cgroup_dirs():
            with contextlib.suppress(OSError):
                _kill_cgroup_tree(top)
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return left


def _cap_bounding(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise RuntimeError("no CapBnd line")


def _cgroup_roots() -> list[str]:
    roots = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                roots.append(fields[4])
    return roots


def _kill_cgroup_tree(top: str) -> None:
    """SIGKILL what is left in our own test cgroup tree (only ever called on kagent-test-*)."""
    assert "/kagent-test-" in top
    for dirpath, _dirs, files in os.walk(top):
        if "cgroup.procs" in files:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)


POOL_THREADS = min(32, (os.cpu_count() or 1) + 4)


@dataclass
class Snapshot:
    fds: list[str]
    rss: int
    threads: int
    children: list[str]
    mounts: list[str]
    cgroups: list[str]
    taken: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, agent: AgentUnderTest) -> Snapshot:
        p = psutil.Process(agent.pid)
        fds = []
        fd_dir = f"/proc/{agent.pid}/fd"
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                fds.append(f"{name} -> {os.readlink(os.path.join(fd_dir, name))}")
        children = []
        for c in p.children(recursive=True):
            try:
                children.append(" ".join(c.cmdline()).strip())
            except psutil.ZombieProcess:
                children.append(f"<zombie {c.pid}>")  # exited, not reaped (yet)
            except psutil.NoSuchProcess:
                continue
        children.sort()
        with open(f"/proc/{agent.pid}/mountinfo") as f:
            mounts = sorted(" ".join(line.split()[3:5]) for line in f)
        return cls(sorted(fds, key=lambda s: int(s.split()[0])), p.memory_info().rss, p.num_threads(),
                   children, mounts, agent.cgroups())

    def diff(self, later: Snapshot, *, rss_slack: int = 16 << 20, thread_slack: int = POOL_THREADS) -> list[str]:
        """What ``later`` holds that this baseline did not (empty: back to baseline).

        Threads may grow by the size of asyncio's default executor (``to_thread``): its
        threads start on demand and stay, up to min(32, cpus + 4).
        """
        problems = []
        if len(later.fds) > len(self.fds):
            extra = sorted(set(_fd_kinds(later.fds)) - set(_fd_kinds(self.fds)))
            problems.append(f"fds {len(self.fds)} -> {len(later.fds)} (new kinds: {extra})")
        if later.rss > self.rss + rss_slack:
            problems.append(f"RSS {self.rss >> 20} MiB -> {later.rss >> 20} MiB")
        if later.threads > self.threads + thread_slack:
            problems.append(f"threads {self.threads} -> {later.threads}")
        if later.children != self.children:
            problems.append(f"children {self.children} -> {later.children}")
        if later.mounts != self.mounts:
            added = sorted(set(later.mounts) - set(self.mounts))
            gone = sorted(set(self.mounts) - set(later.mounts))
            problems.append(f"mounts: added {added}, removed {gone}")
        if later.cgroups != self.cgroups:
            problems.append(f"cgroups {self.cgroups} -> {later.cgroups}")
        return problems


def _fd_kinds(fds: list[str]) -> list[str]:
    return [s.split(" -> ", 1)[1].split("[")[0] if "[" in s else s.split(" -> ", 1)[1] for s in fds]


async def settle(agent: AgentUnderTest, baseline: Snapshot, *, timeout: float = 10, **slack) -> list[str]:
    """Wait (up to ``timeout``) for the agent to come back to ``baseline``; the remaining diff."""
    deadline = time.monotonic() + timeout
    while True:
        problems = baseline.diff(agent.snapshot(), **slack)
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(0.1)


# --- a raw ttRPC client ------------------------------------------------------------------------


class NoAnswer(Exception):
    """The agent did not answer a request (or closed the connection without answering)."""


class RawClient:
    """Requests with raw payloads; every answer is (code, message, payload)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = framing.FrameDecoder()
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=8 << 20)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                for stream_id, _t, _f, _length, payload in self.decoder.feed(data):
                    fut = self.pending.pop(stream_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(payload)
        except (ConnectionError, OSError):
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(NoAnswer("connection closed by the agent"))
            self.pending.clear()

    def send_request(self, service: str, method: str, payload: bytes, *, timeout: float = 0) -> asyncio.Future:
        stream_id = self.next_id
        self.next_id += 2
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=int(timeout * 1e9))
        fut = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = fut
        self.writer.write(framing.encode_frame(stream_id, framing.TYPE_REQUEST, 0, req.SerializeToString()))
        return fut

    async def call(self, service: str, method: str, payload: bytes, *, timeout: float = 1.0,
                   grace: float = 15.0) -> tuple[int, str, bytes]:
        """(code, message, payload); NoAnswer if nothing came ``grace`` seconds after the deadline."""
        fut = self.send_request(service, method, payload, timeout=timeout)
        try:
            body = await asyncio.wait_for(fut, timeout + grace)
        except TimeoutError:
            raise NoAnswer(f"{method}: no answer within {timeout + grace:g}s") from None
        if body is None:
            return 8, "response over the size limit", b""
        resp = ttrpc_pb2.Response.FromString(body)
        return resp.status.code, resp.status.message, resp.payload

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        self.reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self.reader_task


class Calls:
    """RPCs by name on a kagent Client: ``await calls.StartContainer(container_id="c1")``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str):
        method = protocols.find(name)

        async def call(timeout: float = 60, **fields):
            return await self.client.call(method.service, method.name, method.request(**fields),
                                          method.response, timeout=timeout)

        return call

    async def create(self, cid: str, spec: dict, timeout: float = 60):
        return await self.CreateContainer(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec),
                                          timeout=timeout)

    async def drain(self, cid: str, exec_id: str, stderr: bool = False) -> bytes:
        """Read a stream to EOF."""
        read = self.ReadStderr if stderr else self.ReadStdout
        chunks = []
        while True:
            r = await read(container_id=cid, exec_id=exec_id, len=65536)
            if not r.data:
                return b"".join(chunks)
            chunks.append(r.data)
