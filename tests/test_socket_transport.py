"""The server's own socket transport and listener: pushback, closing, accept at the fd limit."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from kagent.protocols import health_pb2, ttrpc_pb2
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc import framing
from kagent.ttrpc import server as server_mod
from kagent.ttrpc.socket_transport import SocketTransport


async def test_a_peer_that_sends_but_never_reads_is_pushed_back(tmp_sock_dir):
    """Replies past the high-water mark stop the reading of requests: memory stays bounded."""
    srv = server_mod.Server(build_routes([HealthService()]))
    addr = "unix://" + os.path.join(tmp_sock_dir, "p.sock")
    await srv.start(addr)
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, addr[len("unix://"):])
        body = ttrpc_pb2.Request(service="grpc.Health", method="Check").SerializeToString()
        batch = b"".join(framing.encode_frame(2 * i + 1, 1, 0, body) for i in range(20_000))
        pushed_back = False
        for _ in range(20):
            try:
                await asyncio.wait_for(loop.sock_sendall(s, batch), 1.0)
            except TimeoutError:
                pushed_back = True
                break
        assert pushed_back, "the server kept reading requests whose replies nobody reads"
        (conn,) = srv._connections
        assert conn.transport.get_write_buffer_size() < 2 * SocketTransport.HIGH_WATER
        assert not conn.transport.is_reading()
        # Reading the replies lets it go on.
        decoder, last = framing.FrameDecoder(), 0
        async with asyncio.timeout(20):
            while conn.writing_paused or not conn.transport.is_reading():
                for sid, _t, _f, _n, payload in decoder.feed(await loop.sock_recv(s, 1 << 20)):
                    # answered (or refused by the in-flight limit), each frame whole
                    assert ttrpc_pb2.Response.FromString(payload).status.code in (0, 8)
                    assert sid % 2 == 1
                    last = max(last, sid)
        assert conn.transport.is_reading()
    finally:
        s.close()
        await srv.close()


async def test_close_flushes_and_abort_gives_back_what_was_lent():
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    b.setblocking(False)
    events: list[object] = []

    class Proto(asyncio.Protocol):
        def connection_lost(self, exc):
            events.append(("lost", exc))

    t = SocketTransport(a, Proto(), loop)
    t.start()
    big = os.urandom(3 << 20)  # more than the socket holds: most of it is queued
    t.write(big)
    t.close()
    assert t.is_closing()
    got = b""
    async with asyncio.timeout(10):
        while len(got) < len(big):
            got += await loop.sock_recv(b, 1 << 20)
    assert got == big and await loop.sock_recv(b, 10) == b""  # all of it, then EOF
    await asyncio.sleep(0)
    assert events == [("lost", None)]

    c, d = socket.socketpair()
    events.clear()
    t = SocketTransport(c, Proto(), loop)
    t.start()
    r, w = os.pipe()
    os.write(w, b"x" * 1000)
    t.write(os.urandom(4 << 20))  # fill the socket so what follows waits in the queue
    t.write_borrowed([b"head", memoryview(b"lent")], lambda: events.append("released"))
    t.splice(b"h", r, 1000, lambda exc: events.append(("spliced", type(exc).__name__)))
    d.close()  # the peer goes away
    t.abort()
    await asyncio.sleep(0)
    assert events[:2] == ["released", ("spliced", "ConnectionResetError")]
    assert events[2][0] == "lost"
    os.close(r)
    os.close(w)


async def test_accept_at_the_descriptor_limit_rests_instead_of_spinning(tmp_sock_dir, monkeypatch):
    monkeypatch.setattr(server_mod._Listener, "BACKOFF", 0.05)
    calls = []

    class Emfile(socket.socket):
        def accept(self):
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

    path = os.path.join(tmp_sock_dir, "l.sock")
    sock = Emfile(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    srv = server_mod.Server({})
    lst = server_mod._Listener(srv, sock, server_mod.parse("unix://" + path))
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(path)  # stays in the backlog: the listener is readable all along
        await asyncio.sleep(0.5)
        assert 3 <= len(calls) <= 20, len(calls)  # ~one try per rest, not a busy loop
    finally:
        peer.close()
        lst.close()


def test_health_reply_is_what_protobuf_encodes():
    """encode_ok through the compiled frame encoder: the same bytes as protobuf's."""
    from kagent.ttrpc.server import encode_ok

    for payload in (b"", health_pb2.HealthCheckResponse(status=1).SerializeToString(), b"z" * 300):
        frame = encode_ok(9, payload)
        resp = ttrpc_pb2.Response.FromString(frame[framing.HEADER_SIZE:])
        expected = ttrpc_pb2.Response(status=ttrpc_pb2.Status(), payload=payload).SerializeToString()
        assert frame[framing.HEADER_SIZE:] == expected and resp.payload == payload
