"""The zygote: a small, single-threaded fork server.

It is forked by the supervisor at start-up, before the event loop and before
any thread exists (fork from a threaded process is unsafe, and fork cost grows
with the parent's RSS).  It then forks one worker per container on request.

Requests (one JSON record each, see kagent.ipc):
  {"op": "ping", "id": N}                      -> {"reply": N, "pid": zygote pid}
  {"op": "spawn", "id": N, "entry": NAME, "args": {...}} + fds[0] = the worker's socket
                                               -> {"reply": N, "pid": worker pid}
                                                  or {"reply": N, "error": text}
                                                  ("kind": "fds" when the zygote is out of fds)
Events the zygote sends on its own:
  {"event": "exit", "pid": P, "status": S}     a worker it forked was reaped
                                               (S = exit code, or 128+signal)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from kagent import ipc

# Worker entry points by name: "module:function", called as fn(sock, args) in
# the forked worker; the worker exits with the function's return value.
ENTRIES: dict[str, str] = {
    "probe": "kagent.zygote:probe_entry",
    "container": "kagent.worker.main:run",
    "console": "kagent.console.shell:shell_entry",
}
# Entries whose worker leads a process group of its own: when it dies, what it leaves in that
# group (a hook it was running, a child not yet in a session of its own) is killed before it
# is reaped.  Not the console: a shell makes a session of its own, which a group leader cannot.
GROUPED = {"container"}


def register_entry(name: str, target: str) -> None:
    ENTRIES[name] = target


def exit_status(status: int) -> int:
    """A wait status as the host sees it: the exit code, or 128+signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


def set_title(title: str) -> None:
    """Name the process for ps and top (cmdline and comm)."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # comm alone is still better than nothing
        with contextlib.suppress(OSError):
            with open("/proc/self/comm", "w") as f:
                f.write(title[:15])


def probe_entry(sock: socket.socket, args: dict) -> int:
    """A worker that reports what it is and exits: lets tests check fork discipline."""
    import threading

    ipc.send(sock, {"event": "probe", "pid": os.getpid(), "ppid": os.getppid(),
                    "threads": threading.active_count(), "args": args})
    return int(args.get("exit", 0))


def _resolve(name: str) -> Callable[[socket.socket, dict], int]:
    target = ENTRIES.get(name)
    if target is None:
        raise KeyError(f"unknown worker entry {name!r}")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _run_worker(entry: Callable, wsock: socket.socket, args: dict, keep: set[int]) -> None:
    """In the forked worker: never returns into the zygote's loop."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        gc.enable()  # the zygote's objects are frozen: a worker's collections never touch them
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        code = int(entry(wsock, args) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


@dataclass
class ZygoteHandle:
    """The supervisor's view of the zygote it forked."""

    pid: int
    sock: socket.socket


def fork_zygote(extra_close: tuple[int, ...] = ()) -> ZygoteHandle:
    """Fork the zygote. Call before any event loop or thread exists."""
    parent_sock, child_sock = ipc.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent_sock.close()
            for fd in extra_close:
                with contextlib.suppress(OSError):
                    os.close(fd)
            code = serve(child_sock)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    child_sock.close()
    return ZygoteHandle(pid, parent_sock)


def serve(sock: socket.socket) -> int:
    """The zygote's loop: answer requests, reap workers, exit when the supervisor goes."""
    set_title("kagent: zygote")
    # No collection from here to the freeze (as the gc.freeze docs advise): one would free
    # objects all over the heap, and each worker filling those holes copies the page.
    gc.disable()
    with contextlib.suppress(ImportError, OSError):
        # Preloaded once here, so that every worker forked later has them already (an import
        # after the fork costs each container start ~100 ms and each worker ~5 MB of its own).
        import kagent.cgroups  # noqa: F401
        import kagent.cgroups.resources  # noqa: F401
        import kagent.cgroups.v1  # noqa: F401
        import kagent.cgroups.v2  # noqa: F401
        import kagent.runtime.container  # noqa: F401
        import kagent.runtime.stdio  # noqa: F401
        import kagent.worker.main  # noqa: F401
    # What the zygote holds now is every worker's too: out of the collector's reach, so a
    # worker's garbage collection never writes to (and so never copies) those pages.
    gc.freeze()
    # Die with the supervisor: a zygote without its agent has no purpose.
    _set_pdeathsig(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us
    rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wr)
    workers: dict[int, bool] = {}  # pid -> leads a process group of its own
    while True:
        ready, _, _ = select.select([sock, rd], [], [], 5.0)
        if rd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(rd, 4096)
        _reap(sock, workers)
        if sock not in ready:
            continue
        try:
            got = ipc.recv(sock, "the zygote")
        except ipc.FdsLost as lost:
            # A spawn whose socket did not arrive (we are at our fd limit): answer it, or the
            # supervisor waits for the reply forever.
            with contextlib.suppress(OSError):
                ipc.send(sock, {"reply": lost.record.get("id"), "error": str(lost), "kind": "fds"})
            continue
        except ValueError:
            continue  # malformed record: ignore, keep serving
        except OSError:
            return 0
        if got is None:
            return 0  # supervisor gone
        msg, fds = got
        _handle(sock, msg, fds, workers)


def _handle(sock: socket.socket, msg: dict, fds: list[int], workers: dict[int, bool]) -> None:
    rid = msg.get("id")
    op = msg.get("op")
    try:
        if op == "ping":
            ipc.send(sock, {"reply": rid, "pid": os.getpid()})
        elif op == "spawn":
            if len(fds) != 1:
                raise ValueError("spawn needs exactly one fd: the worker's socket")
            entry = _resolve(str(msg.get("entry")))
            grouped = msg.get("entry") in GROUPED
            wsock = socket.socket(fileno=fds.pop())
            pid = os.fork()
            if pid == 0:
                sock.close()
                if grouped:
                    with contextlib.suppress(OSError):
                        os.setpgid(0, 0)
                _run_worker(entry, wsock, msg.get("args") or {}, set())
            if grouped:  # on both sides: whichever runs first, the group exists before any request
                with contextlib.suppress(OSError):
                    os.setpgid(pid, pid)
            wsock.close()
            workers[pid] = grouped
            ipc.send(sock, {"reply": rid, "pid": pid})
        else:
            raise ValueError(f"unknown zygote op {op!r}")
    except Exception as exc:
        with contextlib.suppress(OSError):
            ipc.send(sock, {"reply": rid, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _reap(sock: socket.socket, workers: dict[int, bool]) -> None:
    while True:
        try:
            # WNOWAIT: seen, not reaped yet, so its pid (its group's id) is no one else's yet.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if workers.pop(info.si_pid, False):
            with contextlib.suppress(OSError):
                os.killpg(info.si_pid, signal.SIGKILL)
        pid, status = os.waitpid(info.si_pid, 0)
        with contextlib.suppress(OSError):
            ipc.send(sock, {"event": "exit", "pid": pid, "status": exit_status(status)})


def _set_pdeathsig(sig: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
