"""Run a test body where its mounts cannot reach the host: a forked child in a private
mount namespace (unshare(CLONE_NEWNS) + make / rprivate).  When the child exits, its
namespace and every mount made in it are gone; the parent checks that its own mount
table gained nothing under the test's directories.

The body is a plain or an ``async`` function (run on uvloop, failing on exceptions the
loop did not handle); its return value comes back pickled, its failure as a traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import uvloop

from kagent.protocols import agent_pb2
from kagent.runtime import mountinfo, syscalls

CHILD_TIMEOUT = 60.0


def mount_points_under(roots: Iterable[str], pid: int | str = "self") -> list[str]:
    roots = [os.path.realpath(r) for r in roots]
    return [m.mount_point for m in mountinfo.read(pid)
            if any(m.mount_point == r or m.mount_point.startswith(r + "/") for r in roots)]


def _run_body(fn: Callable[..., Any], args: tuple) -> Any:
    result = fn(*args)
    if not inspect.iscoroutine(result):
        return result
    errors: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        value = await result
        await asyncio.sleep(0)
        return value

    value = uvloop.run(main())
    if errors:
        text = "; ".join(f"{e.get('message')}: {e.get('exception')!r}" for e in errors)
        raise AssertionError(f"unhandled exception(s) in the event loop: {text}")
    return value


def run_in_mount_ns(fn: Callable[..., Any], *args: Any, roots: Iterable[str] = (),
                    timeout: float = CHILD_TIMEOUT) -> Any:
    """``fn(*args)`` in a forked child with a private mount namespace; its result."""
    roots = list(roots)
    before = mount_points_under(roots)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            payload = pickle.dumps(("ok", _run_body(fn, args)))
            code = 0
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the test body did not finish within {timeout:g}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    after = mount_points_under(roots)
    assert after == before, f"mounts leaked into the test's own namespace: {set(after) - set(before)}"
    if not chunks:
        pytest.fail("the test body died without a word")
    status, value = pickle.loads(b"".join(chunks))
    if status != "ok":
        pytest.fail(f"in the private mount namespace:\n{value}", pytrace=False)
    return value


def storage(driver: str, mount_point: str, *, source: str = "", fstype: str = "",
            options: Iterable[str] = (), driver_options: Iterable[str] = (), shared: bool = False,
            fs_group: tuple[int, int] | None = None) -> agent_pb2.Storage:
    s = agent_pb2.Storage(driver=driver, mount_point=mount_point, source=source, fstype=fstype,
                          options=list(options), driver_options=list(driver_options), shared=shared)
    if fs_group is not None:
        s.fs_group.group_id, s.fs_group.group_change_policy = fs_group
    return s


def mounted(path: str) -> list[mountinfo.Mount]:
    """The mounts on ``path`` in the calling process's namespace."""
    path = os.path.realpath(path)
    return [m for m in mountinfo.read() if m.mount_point == path]


def fstype_at(path: str) -> str | None:
    found = mounted(path)
    return found[-1].fstype if found else None
