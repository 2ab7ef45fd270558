"""The supervisor's view of one container: its worker, its processes, their stdio.

All container work happens in the worker process (kagent.worker); this object
talks to it over a socketpair, keeps the processes' stdio and pidfds (received
with SCM_RIGHTS), and turns the worker's exit events into the futures that
WaitProcess awaits.  If the worker dies, every process it ran is SIGKILLed
through its pidfd and reported as killed (137), so no waiter hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from kagent import ipc, passfd
from kagent import log as klog
from kagent.errors import (
    AgentError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from kagent.stdio import InputStream, OutputStream
from kagent.ttrpc.codes import Code

_log = klog.get_logger("container")

KILLED = 128 + signal.SIGKILL

# Worker error kinds (the status code name of the domain error the worker raised) → domain
# errors: the one place they are mapped.
_ERRORS: dict[str, type[AgentError]] = {
    cls.code.name: cls
    for cls in (InvalidArgument, AlreadyExists, FailedPrecondition, NotFound, DeadlineExceeded)
}


def worker_error(op: str, cid: str, err: dict) -> AgentError:
    kind = str(err.get("kind"))
    message = str(err.get("message") or "unknown error")
    if "step" in err:  # a set-up failure: say which container it was building
        message = f"{op} container {cid}: {message}"
    cls = _ERRORS.get(kind)
    # Any other kind keeps its code (INTERNAL when it is none).
    return cls(message) if cls is not None else AgentError(message, code=Code.__members__.get(kind))


@dataclass
class Process:
    exec_id: str
    pid: int
    pidfd: int
    terminal: bool
    exited: asyncio.Future
    stdin: InputStream | None = None
    stdout: OutputStream | None = None
    stderr: OutputStream | None = None
    is_init: bool = False
    waited: bool = False
    closed: bool = field(default=False, repr=False)
    # Direct stdio streams (agent.passfd_listener_port): the stdio names pumped to the host's
    # own streams, which ReadStdout/WriteStdin must not touch, and the pumps.
    direct: frozenset[str] = frozenset()
    streams: passfd.Streams | None = field(default=None, repr=False)

    @classmethod
    def from_reply(cls, exec_id: str, reply: dict, fds: list[int], *, is_init: bool = False) -> Process:
        loop = asyncio.get_running_loop()
        terminal = bool(reply.get("terminal"))
        exited = loop.create_future()
        if terminal:
            pidfd, master = fds
            out = OutputStream(master, exited, pty=True)
            return cls(exec_id, int(reply["pid"]), pidfd, True, exited, InputStream(master, pty=True, owns_fd=False),
                       out, None, is_init)
        pidfd, stdin, stdout, stderr = fds
        return cls(exec_id, int(reply["pid"]), pidfd, False, exited, InputStream(stdin), OutputStream(stdout, exited),
                   OutputStream(stderr, exited), is_init)

    def signal(self, sig: int) -> None:
        """Signal through the pidfd: never hits a recycled pid. A process already gone is fine."""
        if self.closed:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def set_exited(self, status: int) -> None:
        if not self.exited.done():
            self.exited.set_result(status)

    def attach_streams(self, claimed: passfd.Claimed) -> None:
        """Pump this process's stdio to the host streams ``claimed`` (a kagent.passfd.Claimed)."""
        self.direct = claimed.names
        self.streams = passfd.attach(claimed, self)

    def check_served(self, name: str) -> None:
        """ReadStdout/WriteStdin on a stdio that goes to a direct stream would race its pump."""
        if name in self.direct or (self.terminal and name in ("stdout", "stderr") and "stdout" in self.direct):
            raise FailedPrecondition(f"{name} of process {self.exec_id} goes to a direct stream "
                                     f"(passfd), not through the {'read' if name != 'stdin' else 'write'} RPCs")

    async def exit_status(self) -> int:
        """The exit status, once the process exited and its direct output streams are flushed
        (as upstream: the host sees the exit only after the last byte of output)."""
        status = await asyncio.shield(self.exited)
        if self.streams is not None:
            await asyncio.shield(self.streams.outputs_done())
        return int(status)

    @property
    def drained(self) -> bool:
        return all(s is None or s.eof or name in self.direct
                   for name, s in (("stdout", self.stdout), ("stderr", self.stderr)))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.streams is not None:
            self.streams.close()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        os.close(self.pidfd)


class Container:
    def __init__(self, cid: str, bundle: str, spec: dict[str, Any], channel: ipc.Channel, worker_pid: int) -> None:
        self.cid = cid
        self.bundle = bundle
        self.spec = spec
        self.channel = channel
        self.worker_pid = worker_pid
        self.state = "creating"
        self.paused_from = ""
        self.cgroup = None  # kagent.cgroups.Manager bound to the container's cgroup
        self.processes: dict[str, Process] = {}
        # Waited-for processes whose output the host may still be reading.
        self.draining: dict[str, Process] = {}
        # Exits that arrive before the reply that introduces the process is processed.
        self._early_exits: dict[str, tuple[int, int]] = {}
        self.lock = asyncio.Lock()  # one life-cycle operation at a time
        channel.closed.add_done_callback(lambda _: self._worker_gone())

    def attach_cgroup(self, parent: str, path: str) -> None:
        """Bind a manager to the cgroup the worker made (stats, freezer, updates, OOM)."""
        if not path:
            return
        from kagent.cgroups import new_manager

        cgroups_path = (self.spec.get("linux") or {}).get("cgroupsPath") or ""
        manager = new_manager(parent).open(cgroups_path, container_id=self.cid)
        if manager.path != path:  # both sides compute it with the same rule
            raise RuntimeError(f"cgroup path mismatch: worker made {path}, supervisor found {manager.path}")
        self.cgroup = manager

    def destroy_cgroup(self, timeout: float) -> None:
        if self.cgroup is None:
            return
        with contextlib.suppress(Exception):
            self.cgroup.kill_all(signal.SIGKILL)
        try:
            self.cgroup.destroy(timeout)
        except Exception as exc:
            _log.warning("container cgroup not removed", container_id=self.cid, error=str(exc))
        self.cgroup = None

    # -- talking to the worker ----------------------------------------------

    async def request(self, op: str, **fields: Any) -> tuple[dict, list[int]]:
        try:
            reply, fds = await self.channel.request({"op": op, **fields})
        except ipc.ChannelClosed:
            raise Unavailable(f"the worker of container {self.cid} is gone") from None
        err = reply.get("error")
        if err is not None:
            for fd in fds:
                os.close(fd)
            raise worker_error(op, self.cid, err)
        return reply, fds

    def on_event(self, event: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if event.get("event") != "exit":
            return
        exec_id = str(event.get("exec_id"))
        pid, status = int(event.get("pid", 0)), int(event.get("status", KILLED))
        _log.debug("process exited", container_id=self.cid, exec_id=exec_id, status=status)
        proc = self.processes.get(exec_id)
        if proc is not None and proc.pid == pid:
            self._exited(proc, status)
        else:
            self._early_exits[exec_id] = (pid, status)

    def _exited(self, proc: Process, status: int) -> None:
        proc.set_exited(status)
        if proc.is_init:
            self.state = "stopped"

    def _worker_gone(self) -> None:
        if self.state == "removed":
            return
        lost = [p for p in self.processes.values() if not p.exited.done()]
        if lost:
            _log.error("container worker died; killing its processes", container_id=self.cid,
                       worker_pid=self.worker_pid, processes=[p.exec_id for p in lost])
        for proc in lost:
            proc.signal(signal.SIGKILL)
            proc.set_exited(KILLED)
        self.state = "stopped"

    # -- processes ----------------------------------------------------------

    def add(self, proc: Process) -> None:
        self.processes[proc.exec_id] = proc
        early = self._early_exits.pop(proc.exec_id, None)
        if early is not None and early[0] == proc.pid:
            self._exited(proc, early[1])

    def forget(self, exec_id: str) -> None:
        """After a failed ExecProcess: an exit the worker reported for its process is dropped,
        so that a later process with this exec id (and, by reuse, that pid) is not taken for it."""
        self._early_exits.pop(exec_id, None)

    def find(self, exec_id: str) -> Process:
        """A live (not yet waited-for) process; the init when ``exec_id`` is empty."""
        proc = self.processes.get(exec_id or self.cid)
        if proc is None:
            raise NotFound(f"process {exec_id or self.cid!r} not found in container {self.cid}")
        return proc

    def find_stream_owner(self, exec_id: str) -> Process:
        """Like find, but also a waited-for process whose output is still being read."""
        key = exec_id or self.cid
        proc = self.processes.get(key) or self.draining.get(key)
        if proc is None:
            raise NotFound(f"process {key!r} not found in container {self.cid}")
        return proc

    def retire(self, proc: Process) -> None:
        """After WaitProcess: out of the table; stdio kept until the host has read it to EOF."""
        proc.waited = True
        if self.processes.get(proc.exec_id) is proc:
            del self.processes[proc.exec_id]
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.drained:
            proc.close()
        else:
            old = self.draining.pop(proc.exec_id, None)
            if old is not None:
                old.close()
            self.draining[proc.exec_id] = proc

    def after_read(self, proc: Process) -> None:
        if proc.waited and proc.drained and self.draining.get(proc.exec_id) is proc:
            del self.draining[proc.exec_id]
            proc.close()

    def close_all(self) -> None:
        for proc in list(self.processes.values()) + list(self.draining.values()):
            proc.set_exited(KILLED)
            proc.close()
        self.processes.clear()
        self.draining.clear()
