"""Helpers for the runtime tests: OCI specs, throwaway workers, running a container.

Containers are never started from the pytest process itself: ``in_worker``
forks a throwaway "worker" (a child subreaper, like kagent's real worker) that
calls the runtime and sends its result back over a pipe, so the pytest process
never changes its own namespaces or pid_for_children.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import time
from collections.abc import Callable

import psutil

from kagent import devtools
from kagent.runtime import syscalls
from kagent.runtime.container import start_init
from kagent.runtime.stdio import ParentStdio, make_stdio

DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]  # `runc spec`'s own


def make_spec(rootfs: str, args: list[str], **process: object) -> dict:
    """runc's default spec (`runc spec`): kagent.devtools' default with runc's three
    capabilities, a cgroup namespace and /sys/fs/cgroup; ``process`` overrides fields."""
    spec = devtools.default_spec(rootfs, args)
    spec["process"]["capabilities"] = {s: list(DEFAULT_CAPS) for s in ("bounding", "effective", "permitted")}
    spec["process"].update(process)
    spec["mounts"].insert(-1, {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    spec["linux"]["namespaces"].append({"type": "cgroup"})
    return spec


class WorkerFailed(Exception):
    pass


def _kill_children_of_self() -> None:
    """In a worker (a subreaper): kill and reap everything below us."""
    me = psutil.Process()
    for _ in range(50):
        kids = me.children(recursive=True)
        if not kids:
            break
        for k in kids:
            try:
                os.kill(k.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.01)
                    break
            except ChildProcessError:
                break


def in_worker(fn: Callable, *args, impl: str | None = None, timeout: float = 30.0, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a forked worker; return its result or re-raise its exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into pytest
        code = 0
        try:
            os.close(r)
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
            if impl:
                syscalls.select(impl)
            try:
                result = ("ok", fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - sent back to the test
                result = ("raise", exc)
            _kill_children_of_self()
            try:
                data = pickle.dumps(result)
            except Exception as exc:  # noqa: BLE001
                data = pickle.dumps(
                    ("raise", WorkerFailed(f"unpicklable result {result!r}: {exc}"))
                )
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                _kill_tree(pid)
                raise WorkerFailed(f"worker timed out after {timeout}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        raise WorkerFailed(f"worker died without a result (status {status:#x})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "raise":
        raise value
    return value


def _kill_tree(pid: int) -> None:
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        procs = []
    for p in [psutil.Process(pid), *procs] if psutil.pid_exists(pid) else procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.wait(5)
        except psutil.Error:
            pass


# --- running a container inside a worker ----------------------------------------------------


def communicate(
    parent: ParentStdio, stdin: bytes = b"", timeout: float = 20.0
) -> tuple[bytes, bytes]:
    """Feed stdin, read stdout/stderr to EOF (or EIO on a pty master)."""
    stdout, stderr = bytearray(), bytearray()
    out = {parent.stdout: stdout}
    if parent.stderr is not None:
        out[parent.stderr] = stderr
    pending = memoryview(stdin)
    writer = parent.stdin
    if not pending and not parent.terminal:
        os.close(writer)
        parent.stdin = -1
        writer = None
    reading = set(out)
    deadline = time.monotonic() + timeout
    while reading:
        wlist = [writer] if writer is not None and pending else []
        rl, wl, _ = select.select(list(reading), wlist, [], max(0.0, deadline - time.monotonic()))
        if not rl and not wl:
            raise TimeoutError(f"container output not finished after {timeout}s: {dict(out)!r}")
        if wl:
            pending = pending[os.write(writer, pending[:65536]) :]
            if not pending and not parent.terminal:
                os.close(writer)
                parent.stdin = -1
                writer = None
        for fd in rl:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:  # a pty master after the slave closed
                    raise
                chunk = b""
            if chunk:
                out[fd] += chunk
            else:
                reading.discard(fd)
    parent.close()
    return bytes(stdout), bytes(stderr)


def run_container(
    spec: dict, bundle: str, stdin: bytes = b"", *, terminal: bool = False, **kw
) -> dict:
    """In a worker: create, start, feed and wait for one container; return what it did."""
    parent, child = make_stdio(terminal)
    try:
        handle = start_init(spec, bundle, child, **kw)
        handle.start()
        stdout, stderr = communicate(parent, stdin)
    finally:
        parent.close()
    _, status = os.waitpid(handle.pid, 0)
    return {
        "status": status,
        "stdout": stdout.decode(errors="surrogateescape"),
        "stderr": stderr.decode(errors="surrogateescape"),
        "warnings": handle.warnings,
    }


def exited(result: dict) -> int:
    status = result["status"]
    assert os.WIFEXITED(status), f"not a normal exit: {status:#x}; {result}"
    return os.WEXITSTATUS(status)
