"""The per-container worker: forked by the zygote, one per container.

It is single-threaded and loop-free.  It builds the container with
kagent.runtime, holds the init until StartContainer, forks exec'd processes,
reaps every child (it is a child subreaper) and reports each exit to the
supervisor.  The parent ends of each process's stdio go to the supervisor
with SCM_RIGHTS, together with a pidfd, so the supervisor serves stdio and can
kill the process without a pid-reuse race, even if this worker dies.

Requests (kagent.ipc records, answered with {"reply": id, ...} or
{"reply": id, "error": {"kind", "message", ...}}; kind is the status code name of the
domain error raised, e.g. "INVALID_ARGUMENT", and a set-up failure adds its step, path, errno):
  create {spec, bundle, pipe_size, cgroup_parent, timings}
                                          -> {pid, terminal, cgroup_path, warnings, timings}
                                             + fds [pidfd, stdin, stdout(, stderr)]
  start                                   -> {}
  exec   {exec_id, process, pipe_size}    -> {pid, terminal} + fds as for create
  signal {exec_id, signal}                -> {}            (a process that is gone is not an error)
  discard {exec_id, pid}                  -> {}            (an exec the supervisor could not take
                                             over: killed, reaped, its exit not reported)
  kill_all {signal}                       -> {}            (the cgroup frozen, every pid signalled, thawed)
  destroy {timeout}                       -> {} once every process is gone and the cgroup
                                             removed; then the worker exits
Events: {"event": "exit", "exec_id", "pid", "status"} (status: code, or 128+signal)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

from kagent import ipc
from kagent.errors import (
    AgentError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from kagent.runtime.errors import InvalidSpec, SetupError
from kagent.ttrpc.codes import Code
from kagent.zygote import exit_status, set_title

DESTROY_GRACE = 10.0  # seconds to wait for SIGKILLed processes when no timeout is given
DISCARD_WAIT = 2.0  # seconds to wait for a discarded exec to die (later, reap() takes it)


def error_fields(exc: Exception) -> dict:
    """An exception as the reply's "error": the supervisor (kagent.container) rebuilds the
    domain error from its kind."""
    if isinstance(exc, SetupError):
        return exc.to_dict()  # kind and message, with the step, path and errno
    if isinstance(exc, AgentError):
        return {"kind": exc.code.name, "message": exc.message}
    return {"kind": Code.INTERNAL.name, "message": f"{type(exc).__name__}: {exc}"}  # a bug


@contextlib.contextmanager
def _timed(timings: list | None, name: str) -> Iterator[None]:
    """Time a step for the supervisor's trace (it has the tracer); nothing when not asked."""
    if timings is None:
        yield
        return
    start = time.time_ns()
    try:
        yield
    finally:
        timings.append([name, start, time.time_ns()])


class Worker:
    def __init__(self, sock: socket.socket, cid: str) -> None:
        self.sock = sock
        self.cid = cid
        self.init = None  # runtime InitHandle
        self.init_pid: int | None = None
        self.spec: dict[str, Any] | None = None
        self.bundle = ""
        self.procs: dict[int, str] = {}  # live pid -> exec_id
        self.exited: dict[str, int] = {}  # exec_id -> status, for processes already reported
        self.cgroup = None  # kagent.cgroups.Manager of the container, once created
        self.destroying = False

    # -- the loop -----------------------------------------------------------

    def serve(self) -> int:
        rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wr)
        while True:
            ready, _, _ = select.select([self.sock, rd], [], [], 1.0)
            if rd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(rd, 4096)
            self.reap()
            if self.sock not in ready:
                continue
            try:
                got = ipc.recv(self.sock)
            except ValueError:
                continue
            except OSError:
                got = None
            if got is None:
                # The supervisor is gone: a container without its agent must not linger.
                self.kill_everything()
                return 1
            msg, fds = got
            for fd in fds:
                os.close(fd)
            if self.handle(msg):
                return 0

    def handle(self, msg: dict) -> bool:
        """Answer one request; True when the worker should exit."""
        rid = msg.get("id")
        op = msg.get("op")
        fds: list[int] = []
        reply: dict[str, Any] = {"reply": rid}
        done = False
        try:
            method = getattr(self, f"op_{op}", None)
            if method is None:
                raise InvalidArgument(f"unknown worker op {op!r}")
            extra, fds = method(msg)
            reply.update(extra)
            done = op == "destroy"
        except Exception as exc:
            reply["error"] = error_fields(exc)
        try:
            ipc.send(self.sock, reply, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return done

    # -- requests -----------------------------------------------------------

    def op_create(self, msg: dict) -> tuple[dict, list[int]]:
        from kagent.runtime.container import start_init
        from kagent.runtime.stdio import make_stdio

        if self.init is not None or self.init_pid is not None:
            raise AlreadyExists(f"container {self.cid} was already created")
        spec = msg["spec"]
        self.bundle = msg["bundle"]
        timings: list | None = [] if msg.get("timings") else None  # asked for when tracing is on
        with _timed(timings, "cgroup apply"):
            warnings = self._create_cgroup(spec, msg.get("cgroup_parent"))
        terminal = bool(spec.get("process", {}).get("terminal"))
        try:
            parent, child = make_stdio(terminal, int(msg.get("pipe_size") or 0))
            try:
                with _timed(timings, "init set-up (namespaces, rootfs, process)"), self._oom_explained(spec):
                    handle = start_init(spec, self.bundle, child, container_id=self.cid,
                                        enter_cgroup=self.cgroup.enter if self.cgroup else None)
            except BaseException:
                parent.close()
                raise
        except BaseException:
            with contextlib.suppress(DeadlineExceeded):  # the set-up error is the one to report
                self._remove_cgroup(5.0)
            raise
        self.init, self.init_pid, self.spec = handle, handle.pid, spec
        self.procs[handle.pid] = self.cid
        extra, fds = self._process_reply(handle.pid, parent)
        extra["cgroup_path"] = self.cgroup.path if self.cgroup else ""
        extra["warnings"] = warnings + list(handle.warnings)
        if timings is not None:
            extra["timings"] = timings
        return extra, fds

    @contextlib.contextmanager
    def _oom_explained(self, spec: dict) -> Iterator[None]:
        """A child SIGKILLed before its exec while its cgroup counted an OOM kill was killed by
        the container's own memory limit: the set-up (a forked Python process, its pages
        charged to the container) does not fit in it.  The spec's mistake, and said so."""
        cgroup = self.cgroup
        before = cgroup.oom_kills() if cgroup is not None else 0
        try:
            yield
        except SetupError as exc:
            if exc.killed_by != signal.SIGKILL or cgroup is None or cgroup.oom_kills() <= before:
                raise
            limit = (((spec.get("linux") or {}).get("resources") or {}).get("memory") or {}).get("limit")
            raise InvalidSpec(exc.step, f"{exc.message}: OOM-killed, the container's memory limit "
                                        f"(linux.resources.memory.limit {limit}) is too low for its "
                                        "set-up") from exc

    def _create_cgroup(self, spec: dict, parent: str | None) -> list[str]:
        """The container's cgroup, made before its init so the init is placed before it runs."""
        if not parent:
            return []
        from kagent.cgroups import new_manager

        linux = spec.get("linux") or {}
        self.cgroup = new_manager(parent)
        try:
            return self.cgroup.create(linux.get("cgroupsPath") or "", linux.get("resources"),
                                      container_id=self.cid)
        except BaseException:
            with contextlib.suppress(DeadlineExceeded):
                self._remove_cgroup(1.0)
            raise

    def _remove_cgroup(self, timeout: float) -> None:
        """Remove the container's cgroup once it is empty (bounded by ``timeout``)."""
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is None or not cgroup.path:
            return
        try:
            cgroup.destroy(timeout)
        except Exception as exc:
            raise DeadlineExceeded(f"container {self.cid}: {exc}") from exc

    def op_start(self, msg: dict) -> tuple[dict, list[int]]:
        if self.init is None:
            raise FailedPrecondition(f"container {self.cid} has no init to start")
        if self.init.started:
            raise FailedPrecondition(f"container {self.cid} is already started")
        try:
            with self._oom_explained(self.spec or {}):
                self.init.start()
        except BaseException:
            if self.init.reaped and self.procs.pop(self.init.pid, None) is not None:
                # start() reaped it: report the exit here, or WaitProcess on it never returns
                status = self.init.status
                code = 128 + signal.SIGKILL if status is None else exit_status(status)
                self._report(self.init.pid, self.cid, code)
            raise
        return {"warnings": list(self.init.warnings)}, []

    def op_exec(self, msg: dict) -> tuple[dict, list[int]]:
        from kagent.runtime.container import exec_process
        from kagent.runtime.stdio import make_stdio

        if self.init_pid is None or self.init_pid not in self.procs:
            raise FailedPrecondition(f"container {self.cid} is not running")
        exec_id = str(msg["exec_id"])
        if exec_id in self.procs.values():
            raise AlreadyExists(f"exec id {exec_id} is already running in container {self.cid}")
        process = msg["process"]
        parent, child = make_stdio(bool(process.get("terminal")), int(msg.get("pipe_size") or 0))
        try:
            with self._oom_explained(self.spec or {}):
                pid = exec_process(self.init_pid, self.spec or {}, process, child,
                                   enter_cgroup=self.cgroup.enter if self.cgroup else None)
        except BaseException:
            parent.close()
            raise
        self.procs[pid] = exec_id
        self.exited.pop(exec_id, None)
        return self._process_reply(pid, parent)

    def op_signal(self, msg: dict) -> tuple[dict, list[int]]:
        exec_id = str(msg["exec_id"])
        sig = int(msg["signal"])
        for pid, eid in self.procs.items():
            if eid == exec_id:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                return {}, []
        if exec_id in self.exited:
            return {}, []  # already gone: signalling it is a no-op, as upstream ignores ESRCH
        raise NotFound(f"process {exec_id} not found in container {self.cid}")

    def op_discard(self, msg: dict) -> tuple[dict, list[int]]:
        """An exec whose reply the supervisor could not take (its fds did not arrive, or the
        request was cancelled): nobody can wait for it or signal it, so it is killed and
        reaped here, unreported.  ``pid`` None: whichever process has this exec id (the
        supervisor lets one exec per id run at a time).  Never the init."""
        exec_id, pid = str(msg["exec_id"]), msg.get("pid")
        for p, eid in list(self.procs.items()):
            if eid != exec_id or p == self.init_pid or (pid is not None and p != int(pid)):
                continue
            del self.procs[p]  # reap() takes it for an orphan from now on: reaped, not reported
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)  # not reaped yet: the pid is still this child's
            deadline = time.monotonic() + DISCARD_WAIT
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(p, os.WNOHANG)[0] == 0 and time.monotonic() < deadline:
                    time.sleep(0.002)
        self.exited.pop(exec_id, None)  # an exit reported already: of a process the host never had
        return {}, []

    def op_kill_all(self, msg: dict) -> tuple[dict, list[int]]:
        sig = int(msg["signal"])
        if self.cgroup is not None:
            self.cgroup.kill_all(sig)  # frozen first, so nothing forks out of reach meanwhile
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return {}, []

    def op_destroy(self, msg: dict) -> tuple[dict, list[int]]:
        timeout = float(msg.get("timeout") or 0) or DESTROY_GRACE
        self.destroying = True
        if self.init is not None and not self.init.started and self.init.pid in self.procs:
            # never started and not reaped yet (so its pid is still ours): kill and reap it now
            self.init.abort()
            self.procs.pop(self.init.pid, None)
            self._report(self.init.pid, self.cid, 128 + signal.SIGKILL)
        if self.cgroup is not None:
            with contextlib.suppress(Exception):
                self.cgroup.kill_all(signal.SIGKILL)  # also what escaped the worker's view
        if not self.kill_everything(timeout):
            left = ", ".join(str(p) for p in self.procs)
            raise DeadlineExceeded(f"container {self.cid}: processes {left} still running after {timeout:g}s")
        self._remove_cgroup(timeout)
        return {}, []

    # -- processes ----------------------------------------------------------

    def _process_reply(self, pid: int, parent) -> tuple[dict, list[int]]:
        if parent.terminal and parent.stdin < 0:
            raise AgentError(f"process {pid} asked for a terminal but sent no console")
        pidfd = os.pidfd_open(pid)
        fds = [pidfd, parent.stdin, parent.stdout] + ([parent.stderr] if parent.stderr is not None else [])
        if parent.terminal:
            fds = [pidfd, parent.stdin]  # the pty master serves stdin and stdout
        return {"pid": pid, "terminal": parent.terminal}, fds

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exec_id = self.procs.pop(pid, None)
            if exec_id is not None:
                self._report(pid, exec_id, exit_status(status))
            # Other pids are orphans re-parented to us (we are a subreaper): reaped, not reported.

    def _report(self, pid: int, exec_id: str, status: int) -> None:
        self.exited[exec_id] = status
        with contextlib.suppress(OSError):
            ipc.send(self.sock, {"event": "exit", "exec_id": exec_id, "pid": pid, "status": status})

    def kill_everything(self, timeout: float = DESTROY_GRACE) -> bool:
        """SIGKILL every process (the init last, so a shared pid ns is not torn down
        under the others' feet) and reap them; True when all are gone."""
        for pid in sorted(self.procs, key=lambda p: p == self.init_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.procs and time.monotonic() < deadline:
            self.reap()
            if self.procs:
                time.sleep(0.005)
        return not self.procs


def run(sock: socket.socket, args: dict) -> int:
    """Zygote entry point for a container worker."""
    from kagent.runtime import syscalls

    cid = str(args.get("cid", "?"))
    set_title(f"kagent: worker {cid}")
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    return Worker(sock, cid).serve()
