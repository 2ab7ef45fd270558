"""The ttRPC server over real unix sockets: behaviour on good and bad input."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct

import pytest

from kagent import protocols
from kagent.errors import NotFound
from kagent.protocols import agent_pb2, health_pb2, ttrpc_pb2
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc import framing
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.server import Route, Server
from kagent.ttrpc.status import RpcError, status_of

HEALTH = "grpc.Health"


class Probe:
    """A test service: Sleep(seconds in .service), Fail, and cancellation records."""

    SERVICE = "test.Probe"

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    async def sleep(self, request: health_pb2.CheckRequest, ctx):
        self.started.set()
        try:
            await asyncio.sleep(float(request.service))
        except asyncio.CancelledError:
            self.cancelled.append(request.service)
            raise
        return health_pb2.CheckRequest(service=request.service)

    async def fail(self, request, ctx):
        raise RuntimeError("the disk is on fire")

    async def big(self, request, ctx):
        return health_pb2.CheckRequest(service="x" * (framing.MESSAGE_LENGTH_MAX + 10))


def make_routes(probe: Probe) -> dict:
    routes = build_routes([HealthService()])
    routes[("test.Probe", "Sleep")] = Route(health_pb2.CheckRequest, probe.sleep)
    routes[("test.Probe", "Fail")] = Route(health_pb2.CheckRequest, probe.fail)
    routes[("test.Probe", "Big")] = Route(health_pb2.CheckRequest, probe.big)
    return routes


async def start_server(sock_dir: str, probe: Probe | None = None, addr: str | None = None):
    probe = probe or Probe()
    server = Server(make_routes(probe))
    addr = addr or "unix://" + os.path.join(sock_dir, "s.sock")
    await server.start(addr)
    return server, addr, probe


async def check(client: Client) -> int:
    resp = await client.call(HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
                             timeout=5)
    return resp.status


class RawPeer:
    """A bare socket that speaks frames, to send what a well-behaved client would not."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.path = path
        self.decoder = framing.FrameDecoder()

    async def connect(self) -> RawPeer:
        await asyncio.get_running_loop().sock_connect(self.sock, self.path)
        return self

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def request(self, stream_id: int, service: str, method: str, payload: bytes = b"", **kw) -> None:
        body = ttrpc_pb2.Request(service=service, method=method, payload=payload, **kw).SerializeToString()
        await self.send(framing.encode_frame(stream_id, framing.TYPE_REQUEST, 0, body))

    async def responses(self, n: int, timeout: float = 5.0) -> dict[int, ttrpc_pb2.Response]:
        got: dict[int, ttrpc_pb2.Response] = {}
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while len(got) < n:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                for sid, typ, _flags, _len, payload in self.decoder.feed(data):
                    assert typ == framing.TYPE_RESPONSE
                    got[sid] = ttrpc_pb2.Response.FromString(payload)
        return got

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    return True

    def close(self) -> None:
        self.sock.close()


async def test_check_and_version(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    try:
        async with await Client.connect(addr) as client:
            assert await check(client) == health_pb2.HealthCheckResponse.SERVING
            ver = await client.call(HEALTH, "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse)
            from kagent import __version__

            assert ver.grpc_version == "0.0.1"
            assert ver.agent_version == __version__
    finally:
        await server.close()


async def test_abstract_socket(tmp_sock_dir):
    name = f"unix://@kagent-test-{os.getpid()}-{id(tmp_sock_dir)}"
    server, addr, _ = await start_server(tmp_sock_dir, addr=name)
    try:
        async with await Client.connect(addr) as client:
            assert await check(client) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.close()


async def test_concurrent_slow_requests_answered_out_of_order(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    try:
        async with await Client.connect(addr) as client:
            order: list[str] = []

            async def call(delay: str):
                resp = await client.call("test.Probe", "Sleep", health_pb2.CheckRequest(service=delay),
                                         health_pb2.CheckRequest, timeout=10)
                order.append(resp.service)

            slow = asyncio.create_task(call("0.4"))
            await asyncio.sleep(0.01)  # the slow one is sent first, on the lower stream id
            fast = asyncio.create_task(call("0.05"))
            await asyncio.gather(slow, fast)
            assert order == ["0.05", "0.4"]
    finally:
        await server.close()


async def test_many_concurrent_requests_one_connection(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    try:
        async with await Client.connect(addr) as client:
            results = await asyncio.gather(*(check(client) for _ in range(500)))
            assert set(results) == {health_pb2.HealthCheckResponse.SERVING}
    finally:
        await server.close()


async def test_many_connections(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    try:
        clients = [await Client.connect(addr) for _ in range(50)]
        assert set(await asyncio.gather(*(check(c) for c in clients))) == {1}
        assert server.connections == 50
        for c in clients:
            await c.close()
    finally:
        await server.close()


async def test_oversized_frame_then_check_on_same_connection(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    peer = await RawPeer(addr[len("unix://"):]).connect()
    try:
        size = framing.MESSAGE_LENGTH_MAX + 1
        await peer.send(framing.encode_header(size, 1, framing.TYPE_REQUEST, 0))
        chunk = b"\xab" * 65536
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            await peer.send(chunk[:n])
            sent += n
        await peer.request(3, HEALTH, "Check", health_pb2.CheckRequest().SerializeToString())
        got = await peer.responses(2)
        assert got[1].status.code == Code.INVALID_ARGUMENT
        assert "4194305" in got[1].status.message and "4194304" in got[1].status.message
        assert got[3].status.code == 0
        assert health_pb2.HealthCheckResponse.FromString(got[3].payload).status == 1
    finally:
        peer.close()
        await server.close()


async def test_bad_requests_get_errors_on_their_own_stream(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    peer = await RawPeer(addr[len("unix://"):]).connect()
    try:
        await peer.request(2, HEALTH, "Check")  # even stream id
        await peer.send(framing.encode_frame(5, framing.TYPE_REQUEST, 0, b"\xff\xff\xff"))  # bad envelope
        await peer.request(7, "grpc.Nope", "Check")  # unknown service
        await peer.request(9, HEALTH, "Nope")  # unknown method
        await peer.request(11, HEALTH, "Check", payload=b"\x0a\xff")  # undecodable payload
        await peer.request(13, "test.Probe", "Fail")  # handler raises
        await peer.request(15, "test.Probe", "Sleep", health_pb2.CheckRequest(service="5").SerializeToString(),
                           timeout_nano=50_000_000)  # deadline
        await peer.request(17, "test.Probe", "Big")  # response too large
        await peer.request(19, HEALTH, "Check")  # and the connection still works
        got = await peer.responses(9)
        assert got[2].status.code == Code.INVALID_ARGUMENT and "odd" in got[2].status.message
        assert got[5].status.code == Code.INVALID_ARGUMENT and "envelope" in got[5].status.message
        assert got[7].status.code == Code.INVALID_ARGUMENT and "grpc.Nope" in got[7].status.message
        assert got[9].status.code == Code.UNIMPLEMENTED and "Nope" in got[9].status.message
        assert got[11].status.code == Code.INVALID_ARGUMENT and "CheckRequest" in got[11].status.message
        assert got[13].status.code == Code.INTERNAL and "the disk is on fire" in got[13].status.message
        assert got[15].status.code == Code.DEADLINE_EXCEEDED
        assert got[17].status.code == Code.INVALID_ARGUMENT and "exceeds" in got[17].status.message
        assert got[19].status.code == 0
    finally:
        peer.close()
        await server.close()


@pytest.mark.parametrize("exc, code, text, unexpected", [
    (NotFound("no such container"), Code.NOT_FOUND, "no such container", False),
    (RpcError(Code.ABORTED, "stop"), Code.ABORTED, "stop", False),
    (TimeoutError(), Code.DEADLINE_EXCEEDED, "timeout", False),
    (NotImplementedError(), Code.UNIMPLEMENTED, "not implemented", False),
    # Out of fds: the agent's load, not a bug (no traceback), and the host may retry.
    (OSError(errno.EMFILE, "Too many open files"), Code.RESOURCE_EXHAUSTED,
     "the agent ran out of file descriptors: [Errno 24] Too many open files", False),
    (OSError(errno.ENFILE, "Too many open files in system", "/run/x"), Code.RESOURCE_EXHAUSTED,
     "the agent ran out of file descriptors: [Errno 23] Too many open files in system: '/run/x'", False),
    # ENOMEM is not mapped (the kernel also answers it for what is no shortage).
    (OSError(errno.ENOMEM, "Cannot allocate memory"), Code.INTERNAL, "[Errno 12] Cannot allocate memory", True),
    (OSError(errno.ENOENT, "No such file or directory", "/x"), Code.INTERNAL,
     "[Errno 2] No such file or directory: '/x'", True),
    (ValueError("bad"), Code.INTERNAL, "ValueError: bad", True),
])
def test_status_of(exc, code, text, unexpected):
    assert status_of(exc) == (code, text, unexpected)


async def test_out_of_fds_is_resource_exhausted_without_a_traceback(tmp_sock_dir):
    async def emfile(request, ctx):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))  # as os.open() at the limit

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logger = logging.getLogger("kagent.ttrpc")
    logger.addHandler(handler)
    routes = make_routes(Probe())
    routes[("test.Probe", "Emfile")] = Route(health_pb2.CheckRequest, emfile)
    server = Server(routes)
    addr = "unix://" + os.path.join(tmp_sock_dir, "s.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as client:
            with pytest.raises(RpcError) as err:
                await client.call("test.Probe", "Emfile", health_pb2.CheckRequest(), health_pb2.CheckRequest)
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "ran out of file descriptors" in err.value.message, err.value
            assert errors == []  # not logged as a handler failure
            with pytest.raises(RpcError):  # while a bug is, with its traceback
                await client.call("test.Probe", "Fail", health_pb2.CheckRequest(), health_pb2.CheckRequest)
            assert [r.getMessage() for r in errors] == ["handler failed"] and errors[0].exc_info
    finally:
        logger.removeHandler(handler)
        await server.close()


async def test_garbage_closes_only_that_connection(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    peer = await RawPeer(addr[len("unix://"):]).connect()
    try:
        async with await Client.connect(addr) as good:
            await peer.send(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
            assert await peer.closed_by_server()
            assert await check(good) == 1
    finally:
        peer.close()
        await server.close()


async def test_client_disconnect_cancels_inflight_handlers(tmp_sock_dir):
    server, addr, probe = await start_server(tmp_sock_dir)
    try:
        client = await Client.connect(addr)
        task = asyncio.create_task(client.call("test.Probe", "Sleep", health_pb2.CheckRequest(service="30"),
                                               health_pb2.CheckRequest))
        await asyncio.wait_for(probe.started.wait(), 5)
        await client.close()
        with pytest.raises(RpcError) as err:
            await task
        assert err.value.code == Code.UNAVAILABLE
        for _ in range(100):
            if probe.cancelled:
                break
            await asyncio.sleep(0.01)
        assert probe.cancelled == ["30"]
        assert server.connections == 0
    finally:
        await server.close()


async def test_every_agent_rpc_is_registered_and_unimplemented_ones_say_so(tmp_sock_dir):
    from kagent.agent import Agent
    from kagent.config import AgentConfig

    agent = Agent(AgentConfig(), None)
    routes = build_routes(agent.services())
    agent_methods = [m for m in protocols.methods().values() if m.service == "grpc.AgentService"]
    assert len(agent_methods) == 42
    server = Server(routes)
    addr = "unix://" + os.path.join(tmp_sock_dir, "a.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as client:
            for m in agent_methods:
                try:
                    await client.call(m.service, m.name, m.request(), m.response, timeout=5)
                except RpcError as exc:
                    if exc.code == Code.UNIMPLEMENTED:
                        assert m.name in exc.message
                    continue
    finally:
        await server.close()


async def test_close_removes_socket_file_and_refuses_new_connections(tmp_sock_dir):
    server, addr, _ = await start_server(tmp_sock_dir)
    path = addr[len("unix://"):]
    client = await Client.connect(addr)
    assert os.path.exists(path)
    await server.close()
    assert not os.path.exists(path)
    with pytest.raises(RpcError):
        await check(client)
    with pytest.raises(ConnectionError):
        await Client.connect(addr, timeout=0.2)


async def test_stale_socket_file_is_replaced_but_live_one_is_refused(tmp_sock_dir):
    path = os.path.join(tmp_sock_dir, "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    server, addr, _ = await start_server(tmp_sock_dir)
    try:
        with pytest.raises(OSError, match="another process"):
            await Server({}).start(addr)
        async with await Client.connect(addr) as client:
            assert await check(client) == 1
    finally:
        await server.close()


async def test_serial_port_transport_reconnects(tmp_sock_dir):
    """A pty stands in for a virtio-serial port: the agent opens the slave side."""
    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    import tty

    tty.setraw(master)
    server = Server(make_routes(Probe()))
    await server.start("serial://" + slave_path)
    os.close(slave)
    loop = asyncio.get_running_loop()
    try:
        os.set_blocking(master, False)
        decoder = framing.FrameDecoder()

        async def roundtrip(stream_id: int) -> ttrpc_pb2.Response:
            body = ttrpc_pb2.Request(service=HEALTH, method="Check").SerializeToString()
            os.write(master, framing.encode_frame(stream_id, framing.TYPE_REQUEST, 0, body))
            async with asyncio.timeout(5):
                while True:
                    fut = loop.create_future()
                    loop.add_reader(master, fut.set_result, None)
                    try:
                        await fut
                    finally:
                        loop.remove_reader(master)
                    try:
                        data = os.read(master, 65536)
                    except BlockingIOError:
                        continue
                    frames = decoder.feed(data)
                    if frames:
                        return ttrpc_pb2.Response.FromString(frames[0][4])

        for _ in range(50):  # the server opens the port asynchronously
            await asyncio.sleep(0.02)
            if server.connections:
                break
        assert (await roundtrip(1)).status.code == 0
        assert (await roundtrip(3)).status.code == 0
    finally:
        await server.close()
        os.close(master)


async def test_hybrid_vsock_client_handshake(tmp_sock_dir):
    """hvsock://PATH:PORT — a fake hypervisor proxy answers CONNECT and forwards to the agent."""
    server, addr, _ = await start_server(tmp_sock_dir)
    proxy_path = os.path.join(tmp_sock_dir, "kata.hvsock")
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        line = await reader.readline()
        seen.append(line)
        if line != b"CONNECT 1024\n":
            writer.write(b"ERR no such port\n")
            writer.close()
            return
        writer.write(b"OK 1073741824\n")
        up_r, up_w = await asyncio.open_unix_connection(addr[len("unix://"):])

        async def pipe(r, w):
            while data := await r.read(65536):
                w.write(data)
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    proxy_server = await asyncio.start_unix_server(proxy, proxy_path)
    try:
        async with await Client.connect(f"hvsock://{proxy_path}:1024") as client:
            assert await check(client) == 1
        assert seen == [b"CONNECT 1024\n"]
        with pytest.raises(ConnectionError, match="refused"):
            await Client.connect(f"hvsock://{proxy_path}:9", timeout=0.1)
    finally:
        proxy_server.close()
        await server.close()


def test_encode_ok_matches_protobuf():
    from kagent.ttrpc.server import encode_ok

    for payload in (b"", b"x", b"y" * 200, b"z" * 70000):
        frame = encode_ok(7, payload)
        length, sid, typ, flags = struct.unpack(">IIBB", frame[:10])
        assert (sid, typ, flags) == (7, framing.TYPE_RESPONSE, 0)
        resp = ttrpc_pb2.Response.FromString(frame[10:])
        assert resp.HasField("status") and resp.status.code == 0
        assert resp.payload == payload
        assert length == len(frame) - 10


def test_agent_proto_request_type_for_create_container():
    m = protocols.find("CreateContainer")
    assert m.request is agent_pb2.CreateContainerRequest


async def test_interceptors_wrap_every_call_outermost_first(tmp_sock_dir):
    seen: list[str] = []

    async def outer(ctx, request, call_next):
        seen.append(f"outer:{ctx.request_name}")
        response = await call_next()
        seen.append("outer:done")
        return response

    async def refuse_sleep(ctx, request, call_next):
        seen.append("inner")
        if ctx.method == "Sleep":
            from kagent.errors import PermissionDenied

            raise PermissionDenied(f"{ctx.request_name} is blocked")
        return await call_next()

    server = Server(make_routes(Probe()), interceptors=[outer, refuse_sleep])
    addr = "unix://" + os.path.join(tmp_sock_dir, "i.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as client:
            assert await check(client) == 1
            with pytest.raises(RpcError) as err:
                await client.call("test.Probe", "Sleep", health_pb2.CheckRequest(service="0"), health_pb2.CheckRequest)
            assert err.value.code == Code.PERMISSION_DENIED and "CheckRequest is blocked" in err.value.message
        assert seen == ["outer:CheckRequest", "inner", "outer:done", "outer:CheckRequest", "inner"]
    finally:
        await server.close()
