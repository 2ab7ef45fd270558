"""The server's own write path and ReadStdout replies sent from the pipe (copy and splice).

Real pipes, real unix sockets, an in-process server: a test service serves
reads of one pipe the way ReadStdout does (kagent.stdio.OutputStream.reply).
Both ways of sending a reply are run over the same cases and must give the
host the same bytes; a peer that stops reading must leave the output in the
pipe, not in the agent; frames must come out whole whatever is queued.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket

import pytest

from kagent import stdio
from kagent.protocols import agent_pb2, health_pb2, ttrpc_pb2
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc import framing, socket_transport
from kagent.ttrpc.client import Client
from kagent.ttrpc.server import Route, Server, eager
from kagent.ttrpc.status import RpcError

MODES = ["copy", "splice"]
MiB = 1 << 20
F_SETPIPE_SZ = 1031


_CYCLE = bytes(k * 7 % 251 for k in range(251))


def pattern(start: int, size: int) -> bytes:
    """Bytes whose value says where they are in the stream, mod 251 (so order and loss show)."""
    first = start % 251
    return (_CYCLE * ((first + size) // 251 + 1))[first : first + size]


class StdioProbe:
    """``test.Stdio/Read``: ReadStdout over one pipe, as kagent.service.containers serves it."""

    def __init__(self, stream: stdio.OutputStream) -> None:
        self.stream = stream

    @eager
    async def Read(self, req: agent_pb2.ReadStreamRequest, ctx):
        return await self.stream.reply(req.len, ctx.connection)


class Pipe:
    """A pipe whose read end is served as a process's stdout; the test writes the other end."""

    def __init__(self, size: int = MiB) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(self.r, F_SETPIPE_SZ, size)
        os.set_blocking(self.w, False)
        loop = asyncio.get_running_loop()
        self.exited = loop.create_future()
        self.stream = stdio.OutputStream(self.r, self.exited)
        self.written = 0

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                n = os.write(self.w, view)
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_writer(self.w, lambda f=fut: f.done() or f.set_result(None))
                try:
                    await fut
                finally:
                    loop.remove_writer(self.w)
                continue
            view = view[n:]
            self.written += n

    def end(self) -> None:
        os.close(self.w)
        self.exited.set_result(0)

    def close(self) -> None:
        self.stream.close()


async def start(sock_dir: str, pipe: Pipe) -> tuple[Server, str]:
    routes = build_routes([HealthService()])
    routes[("test.Stdio", "Read")] = Route(agent_pb2.ReadStreamRequest, StdioProbe(pipe.stream).Read)
    server = Server(routes)
    addr = "unix://" + os.path.join(sock_dir, "s.sock")
    await server.start(addr)
    return server, addr


async def read_all(client: Client, size: int) -> bytes:
    chunks = []
    while True:
        r = await client.call("test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=size),
                              agent_pb2.ReadStreamResponse, timeout=10)
        if not r.data:
            return b"".join(chunks)
        chunks.append(r.data)


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setattr(stdio, "MODE", request.param)
    calls = {"splice": 0}
    real = os.splice

    def counting(*args, **kw):
        calls["splice"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(os, "splice", counting)
    return request.param, calls


@pytest.mark.parametrize("size", [1, 4096, 32768, MiB])
async def test_read_back_exactly_what_was_written(tmp_sock_dir, mode, size):
    name, calls = mode
    pipe = Pipe()
    server, addr = await start(tmp_sock_dir, pipe)
    data = pattern(0, min(3 * MiB, size * 700) + 123)  # a few hundred round trips at most
    try:
        async with await Client.connect(addr) as client:
            writer = asyncio.create_task(pipe.write(data))
            reader = asyncio.create_task(read_all(client, size))
            await writer
            pipe.end()
            got = await reader
        assert got == data
        # The reply went the way MODE says (a unix socket can take spliced bytes).
        assert (calls["splice"] > 0) == (name == "splice")
    finally:
        pipe.close()
        await server.close()


async def test_copy_and_splice_give_identical_results(tmp_sock_dir, monkeypatch):
    results = {}
    for name in MODES:
        monkeypatch.setattr(stdio, "MODE", name)
        pipe = Pipe()
        server, addr = await start(tmp_sock_dir, pipe)
        try:
            async with await Client.connect(addr) as client:
                await pipe.write(pattern(5, 700_000))  # fits the 1 MiB pipe: no reader needed yet
                pipe.end()
                sizes = [100, 32768, 4096, MiB, MiB]
                got = []
                for s in sizes:
                    r = await client.call("test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=s),
                                          agent_pb2.ReadStreamResponse, timeout=10)
                    got.append(r.data)
                results[name] = got
        finally:
            pipe.close()
            await server.close()
    # Same chunking too: each reply takes min(len, what is in the pipe) either way.
    assert results["copy"] == results["splice"]
    assert [len(c) for c in results["splice"]] == [100, 32768, 4096, 700_000 - 100 - 32768 - 4096, 0]


class RawPeer:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.path = path
        self.decoder = framing.FrameDecoder()

    async def connect(self) -> RawPeer:
        await asyncio.get_running_loop().sock_connect(self.sock, self.path)
        return self

    async def send(self, frames: list[bytes]) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, b"".join(frames))

    async def frames(self, n: int, timeout: float = 20.0) -> list[tuple[int, ttrpc_pb2.Response]]:
        got: list[tuple[int, ttrpc_pb2.Response]] = []
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while len(got) < n:
                data = await loop.sock_recv(self.sock, 1 << 20)
                if not data:
                    raise ConnectionError("server closed the connection")
                for sid, typ, _f, _l, payload in self.decoder.feed(data):
                    assert typ == framing.TYPE_RESPONSE
                    got.append((sid, ttrpc_pb2.Response.FromString(payload)))
        return got

    def close(self) -> None:
        self.sock.close()


def request(sid: int, service: str, method: str, msg) -> bytes:
    body = ttrpc_pb2.Request(service=service, method=method, payload=msg.SerializeToString()).SerializeToString()
    return framing.encode_frame(sid, framing.TYPE_REQUEST, 0, body)


def the_connection(server: Server):
    (conn,) = server._connections
    return conn


async def test_a_peer_that_stops_reading_leaves_output_in_the_pipe(tmp_sock_dir, mode):
    """Flow control: replies wait for the socket; the output waits in the pipe, not in the agent."""
    name, _ = mode
    pipe = Pipe()
    server, addr = await start(tmp_sock_dir, pipe)
    peer = await RawPeer(addr[len("unix://"):]).connect()
    try:
        total = 16 * MiB
        writer = asyncio.create_task(pipe.write(pattern(0, total)))
        # Many 1 MiB reads, interleaved with small RPCs, and nobody reading the replies.
        frames = []
        for i in range(24):
            frames.append(request(4 * i + 1, "test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=MiB)))
            frames.append(request(4 * i + 3, "grpc.Health", "Check", health_pb2.CheckRequest()))
        await peer.send(frames)
        await asyncio.sleep(0.5)
        conn = the_connection(server)
        held = conn.transport.get_write_buffer_size()
        assert held <= socket_transport.SocketTransport.HIGH_WATER + MiB, held
        assert not writer.done(), "the writer must be blocked on a full pipe"
        assert stdio.fionread(pipe.r) >= MiB - 4096, "the output must still be in the pipe"
        # Now read: every frame whole, the data in order, the small replies intact.
        reading = asyncio.create_task(peer.frames(48))
        await writer
        pipe.end()  # the reads left over get EOF
        got = await reading
        data = b""
        for sid, resp in got:
            assert resp.status.code == 0, resp.status
            if sid % 4 == 1:
                data += agent_pb2.ReadStreamResponse.FromString(resp.payload).data
            else:
                assert health_pb2.HealthCheckResponse.FromString(resp.payload).status == 1
        assert len(data) >= MiB and data == pattern(0, len(data))
    finally:
        peer.close()
        pipe.close()
        await server.close()


async def test_frames_never_interleave_under_a_full_socket(tmp_sock_dir, mode):
    """Spliced and borrowed replies queued behind a full socket, small replies in between."""
    pipe = Pipe()
    server, addr = await start(tmp_sock_dir, pipe)
    peer = await RawPeer(addr[len("unix://"):]).connect()
    try:
        await pipe.write(pattern(0, 900_000))
        frames = []
        sid = 1
        for i in range(40):
            size = (1, 100, 4096, 65536, 300_000)[i % 5]
            frames.append(request(sid, "test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=size)))
            frames.append(request(sid + 2, "grpc.Health", "Check", health_pb2.CheckRequest()))
            sid += 4
        await peer.send(frames)
        refill = asyncio.create_task(pipe.write(pattern(900_000, 4 * MiB)))
        got = await peer.frames(80)
        data = b"".join(agent_pb2.ReadStreamResponse.FromString(r.payload).data for s, r in got if s % 4 == 1)
        assert all(r.status.code == 0 for _, r in got)
        assert data == pattern(0, len(data))
        assert sorted(s for s, _ in got) == list(range(1, sid, 2))
        refill.cancel()
    finally:
        peer.close()
        pipe.close()
        await server.close()


async def test_eof_after_exit_and_disconnect_mid_read(tmp_sock_dir, mode):
    pipe = Pipe()
    server, addr = await start(tmp_sock_dir, pipe)
    try:
        client = await Client.connect(addr)
        # Nothing written yet: the read waits (a task takes over the eager handler)...
        pending = asyncio.create_task(client.call("test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=10),
                                                  agent_pb2.ReadStreamResponse))
        await asyncio.sleep(0.1)
        assert not pending.done()
        await pipe.write(b"hello")
        assert (await pending).data == b"hello"
        # ...and a client that goes away while its read waits releases the stream.
        gone = asyncio.create_task(client.call("test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=10),
                                               agent_pb2.ReadStreamResponse))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(RpcError):
            await gone
        async with await Client.connect(addr) as again:
            await pipe.write(b"world")
            pipe.end()
            assert await read_all(again, 4096) == b"world"
    finally:
        pipe.close()
        await server.close()


async def test_serial_connection_replies_by_copy(tmp_sock_dir, monkeypatch):
    """A transport that cannot splice (a serial port) gets the same replies by copy."""
    import tty

    monkeypatch.setattr(stdio, "MODE", "splice")
    master, slave = os.openpty()
    tty.setraw(master)
    pipe = Pipe()
    routes = {("test.Stdio", "Read"): Route(agent_pb2.ReadStreamRequest, StdioProbe(pipe.stream).Read)}
    server = Server(routes)
    await server.start("serial://" + os.ttyname(slave))
    os.close(slave)
    loop = asyncio.get_running_loop()
    try:
        os.set_blocking(master, False)
        for _ in range(50):
            await asyncio.sleep(0.02)
            if server.connections:
                break
        await pipe.write(pattern(0, 5000))
        os.write(master, request(1, "test.Stdio", "Read", agent_pb2.ReadStreamRequest(len=4000)))
        decoder = framing.FrameDecoder()
        async with asyncio.timeout(5):
            frames = []
            while not frames:
                fut = loop.create_future()
                loop.add_reader(master, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_reader(master)
                try:
                    frames = decoder.feed(os.read(master, 65536))
                except BlockingIOError:
                    continue
        resp = ttrpc_pb2.Response.FromString(frames[0][4])
        assert agent_pb2.ReadStreamResponse.FromString(resp.payload).data == pattern(0, 4000)
    finally:
        await server.close()
        os.close(master)
        pipe.close()


async def test_splice_without_a_relay_pipe(tmp_sock_dir, monkeypatch):
    """If no relay pipe can be made (EMFILE), the header is sent, then spliced pipe → socket."""
    monkeypatch.setattr(stdio, "MODE", "splice")
    monkeypatch.setattr(socket_transport.SocketTransport, "_make_relay", lambda self: None)
    pipe = Pipe()
    server, addr = await start(tmp_sock_dir, pipe)
    data = pattern(3, 2 * MiB + 5)
    try:
        async with await Client.connect(addr) as client:
            writer = asyncio.create_task(pipe.write(data))
            reader = asyncio.create_task(read_all(client, MiB))
            await writer
            pipe.end()
            assert await reader == data
    finally:
        pipe.close()
        await server.close()


@pytest.mark.parametrize("count", [1, 127, 128, 16383, 16384, 32768, MiB, stdio.MAX_READ])
def test_reply_head_is_the_protobuf_encoding(count):
    """Header + prefixes by hand, then the data: byte for byte what protobuf would send."""
    data = b"\xa5" * count
    frame = stdio.reply_head(11, count) + data
    payload = agent_pb2.ReadStreamResponse(data=data).SerializeToString()
    body = ttrpc_pb2.Response(status=ttrpc_pb2.Status(), payload=payload).SerializeToString()
    assert frame == framing.encode_header(len(body), 11, framing.TYPE_RESPONSE, 0) + body
    assert len(body) <= framing.MESSAGE_LENGTH_MAX


async def test_a_reply_dropped_by_an_interceptor_leaves_the_stream_usable(tmp_sock_dir):
    """discard() keeps the bytes for the next read; drop() throws them away. Either frees the stream."""
    pipe = Pipe()
    try:
        await pipe.write(b"first second")
        reply = await pipe.stream.reply(5, None)
        assert isinstance(reply, stdio.PipeReply)
        reply.discard()
        reply = await pipe.stream.reply(6, None)
        assert reply.drop() == 6  # "first " is gone
        pipe.end()
        assert await pipe.stream.read(100) == b"second"
        assert await pipe.stream.read(100) == b""
    finally:
        pipe.close()
