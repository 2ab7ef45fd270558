"""kagent.ipc records: inline ones, large ones (through a memfd), fds riding along, and what
a receiver does with a record that cannot be delivered whole."""

from __future__ import annotations

import asyncio
import os
import resource
import socket

import pytest

from kagent import ipc


def _pipe_fds() -> tuple[int, int]:
    r, w = os.pipe()
    return r, w


def test_small_record_with_fds():
    a, b = ipc.socketpair()
    r, w = _pipe_fds()
    try:
        ipc.send(a, {"op": "x", "n": 1}, [w])
        obj, fds = ipc.recv(b)
        assert obj == {"op": "x", "n": 1} and len(fds) == 1
        os.write(fds[0], b"hi")
        os.close(fds[0])
        assert os.read(r, 2) == b"hi"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("size", [ipc.INLINE_MAX + 1, 300 << 10, 5 << 20])
def test_large_record_travels_in_a_memfd(size):
    """Larger than a SEQPACKET record may be (EMSGSIZE beyond the ~208 KiB send buffer): the
    receiver gets it whole, with the sender's fds and no memfd left over."""
    a, b = ipc.socketpair()
    r, w = _pipe_fds()
    try:
        env = ["X" * 1000 + f"={i}" for i in range(size // 1000)]
        ipc.send(a, {"id": 7, "op": "create", "env": env}, [w])
        before = set(os.listdir("/proc/self/fd"))
        obj, fds = ipc.recv(b)
        assert obj == {"id": 7, "op": "create", "env": env}
        assert len(fds) == 1 and os.path.samestat(os.fstat(fds[0]), os.fstat(w))
        os.close(fds[0])
        assert set(os.listdir("/proc/self/fd")) <= before  # the memfd was closed by recv
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_malformed_large_head_is_refused_and_its_fds_closed():
    a, b = ipc.socketpair()
    r, w = _pipe_fds()
    try:
        socket.send_fds(a, [b'{"_large": 10}'], [w])  # no memfd: the last fd is a pipe end
        with pytest.raises(ValueError):
            ipc.recv(b)
        socket.send_fds(a, [b'{"_large": "big"}'], [w])
        with pytest.raises(ValueError, match="malformed large"):
            ipc.recv(b)
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # every copy of the write end is closed: nothing leaked
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        a.close()
        b.close()


def test_a_large_record_whose_memfd_is_lost_keeps_its_routing():
    """At the receiver's fd limit the memfd does not arrive (MSG_CTRUNC): FdsLost carries the
    head's routing fields, so that the request can still be answered."""
    a, b = ipc.socketpair()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        ipc.send(a, {"id": 3, "op": "spawn", "blob": "y" * (ipc.INLINE_MAX + 10)})
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        while True:  # fill the table below the limit
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        with pytest.raises(ipc.FdsLost) as lost:
            ipc.recv(b)
        assert lost.value.record == {"id": 3, "op": "spawn", "_large": lost.value.record["_large"]}
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        a.close()
        b.close()


async def test_channel_request_waits_for_room_instead_of_failing():
    """The supervisor's side never fails a request because the peer has not read earlier
    ones yet: records that do not fit the socket's buffer wait for it to drain."""
    mine, theirs = ipc.socketpair()
    chan = ipc.Channel(mine, name="test peer")
    sent = 40
    blob = "z" * (ipc.INLINE_MAX - 100)  # inline records, ~64 KiB each: the buffer fills after a few
    try:
        requests = [asyncio.ensure_future(chan.request({"op": "echo", "blob": blob})) for _ in range(sent)]
        await asyncio.sleep(0.1)
        assert not any(r.done() for r in requests)  # nothing failed with EAGAIN
        loop = asyncio.get_running_loop()
        for _ in range(sent):
            obj, fds = await loop.run_in_executor(None, ipc.recv, theirs)
            ipc.send(theirs, {"reply": obj["id"], "len": len(obj["blob"])})
        replies = await asyncio.gather(*requests)
        assert [r[0]["len"] for r in replies] == [len(blob)] * sent
    finally:
        chan.close()
        theirs.close()
