"""The zygote: forked before any loop or thread, forks workers, reports exits."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kagent import ipc
from kagent.zygote import exit_status, fork_zygote


@pytest.fixture
def zygote():
    handle = fork_zygote()
    try:
        yield handle
    finally:
        handle.sock.close()  # EOF: the zygote exits by itself
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(handle.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        else:
            os.kill(handle.pid, signal.SIGKILL)
            os.waitpid(handle.pid, 0)


def _request(sock, msg, fds=()):
    ipc.send(sock, msg, fds)
    while True:
        got = ipc.recv(sock)
        assert got is not None, "zygote closed its socket"
        if got[0].get("reply") == msg["id"]:
            return got


def test_ping_and_name(zygote):
    reply, _ = _request(zygote.sock, {"op": "ping", "id": 1})
    assert reply["pid"] == zygote.pid
    with open(f"/proc/{zygote.pid}/cmdline", "rb") as f:
        assert f.read().startswith(b"kagent: zygote")


def test_spawn_worker_reports_and_exit_is_reaped(zygote):
    mine, theirs = ipc.socketpair()
    reply, _ = _request(zygote.sock, {"op": "spawn", "id": 2, "entry": "probe", "args": {"exit": 7}},
                        [theirs.fileno()])
    theirs.close()
    worker = reply["pid"]
    probe, _ = ipc.recv(mine)
    assert probe == {"event": "probe", "pid": worker, "ppid": zygote.pid, "threads": 1, "args": {"exit": 7}}
    assert ipc.recv(mine) is None  # the worker exited: EOF on its socket
    mine.close()
    event, _ = ipc.recv(zygote.sock)
    assert event == {"event": "exit", "pid": worker, "status": 7}


def test_bad_requests_answered_and_zygote_goes_on(zygote):
    reply, _ = _request(zygote.sock, {"op": "explode", "id": 3})
    assert "unknown zygote op" in reply["error"]
    reply, _ = _request(zygote.sock, {"op": "spawn", "id": 4, "entry": "nope"}, [os.dup(0)])
    assert "unknown worker entry" in reply["error"]
    reply, _ = _request(zygote.sock, {"op": "spawn", "id": 5, "entry": "probe"})
    assert "exactly one fd" in reply["error"]
    zygote.sock.send(b"not json at all")
    reply, _ = _request(zygote.sock, {"op": "ping", "id": 6})
    assert reply["pid"] == zygote.pid


def test_zygote_exits_when_supervisor_socket_closes():
    handle = fork_zygote()
    handle.sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pid, status = os.waitpid(handle.pid, os.WNOHANG)
        if pid:
            assert exit_status(status) == 0
            return
        time.sleep(0.01)
    os.kill(handle.pid, signal.SIGKILL)
    os.waitpid(handle.pid, 0)
    pytest.fail("zygote did not exit after EOF")


def test_exit_status_mapping():
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137
