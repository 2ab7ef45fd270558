"""Resource bounds of the ttRPC server (kagent.ttrpc.limits): each one exceeded gives a
clear RESOURCE_EXHAUSTED on that stream, and everything else goes on."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import reliability_harness as harness

from kagent.protocols import health_pb2, ttrpc_pb2
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc import framing
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.limits import Limits
from kagent.ttrpc.server import Route, Server
from kagent.ttrpc.status import RpcError

HEALTH = "grpc.Health"


class Slow:
    """test.Slow/Sleep: sleeps ``float(request.service)`` seconds."""

    def __init__(self) -> None:
        self.running = 0

    async def sleep(self, request: health_pb2.CheckRequest, ctx):
        self.running += 1
        try:
            await asyncio.sleep(float(request.service or 0))
        finally:
            self.running -= 1
        return request


async def serve(tmp_sock_dir: str, limits: Limits) -> tuple[Server, str, Slow]:
    slow = Slow()
    routes = build_routes([HealthService()])
    routes[("test.Slow", "Sleep")] = Route(health_pb2.CheckRequest, slow.sleep)
    server = Server(routes, limits=limits)
    addr = "unix://" + os.path.join(tmp_sock_dir, "s.sock")
    await server.start(addr)
    return server, addr, slow


async def check(client: Client) -> int:
    r = await client.call(HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse, timeout=5)
    return r.status


def sleep_call(client: Client, seconds: float, payload_pad: int = 0):
    req = health_pb2.CheckRequest(service=f"{seconds}".ljust(payload_pad, " ") if payload_pad else f"{seconds}")
    return client.call("test.Slow", "Sleep", req, health_pb2.CheckRequest, timeout=10)


async def wait_until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_connections_over_the_limit_are_answered_then_closed(tmp_sock_dir):
    server, addr, _ = await serve(tmp_sock_dir, Limits(max_connections=3))
    try:
        clients = [await Client.connect(addr) for _ in range(3)]
        assert [await check(c) for c in clients] == [1, 1, 1]
        extra = await Client.connect(addr)
        with pytest.raises(RpcError) as err:
            await check(extra)
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        assert "too many connections" in err.value.message and "agent.ttrpc_max_connections" in err.value.message
        await wait_until(lambda: extra.closed)  # then closed by the agent
        assert server.connections == 3 and server.admission.refused_connections == 1
        assert [await check(c) for c in clients] == [1, 1, 1]  # the others go on
        await clients[0].close()
        await wait_until(lambda: server.admission.connections == 2)
        again = await Client.connect(addr)  # a slot freed: admitted
        assert await check(again) == 1
        for c in clients[1:] + [again]:
            await c.close()
    finally:
        await server.close()


async def test_a_refused_connection_that_says_nothing_is_closed(tmp_sock_dir):
    server, addr, _ = await serve(tmp_sock_dir, Limits(max_connections=1, refuse_grace=0.2))
    loop = asyncio.get_running_loop()
    try:
        first = await Client.connect(addr)
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.setblocking(False)
        await loop.sock_connect(mute, addr[len("unix://"):])
        async with asyncio.timeout(3):
            assert await loop.sock_recv(mute, 10) == b""  # closed without a word
        mute.close()
        assert await check(first) == 1
        await first.close()
    finally:
        await server.close()


async def test_inflight_per_connection(tmp_sock_dir):
    server, addr, slow = await serve(tmp_sock_dir, Limits(max_inflight=2))
    try:
        async with await Client.connect(addr) as c, await Client.connect(addr) as other:
            busy = [asyncio.create_task(sleep_call(c, 0.5)) for _ in range(2)]
            await wait_until(lambda: slow.running == 2)
            with pytest.raises(RpcError) as err:
                await sleep_call(c, 0)
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "on this connection (2, limit 2, agent.ttrpc_max_inflight)" in err.value.message
            assert (await sleep_call(other, 0)).service == "0"  # another connection is not limited
            await asyncio.gather(*busy)
            assert (await sleep_call(c, 0)).service == "0"  # and after they finish, served again
            assert server.admission.refused_requests == 1
    finally:
        await server.close()


async def test_inflight_total(tmp_sock_dir):
    server, addr, slow = await serve(tmp_sock_dir, Limits(max_inflight_total=3))
    try:
        clients = [await Client.connect(addr) for _ in range(3)]
        busy = [asyncio.create_task(sleep_call(c, 0.5)) for c in clients]
        await wait_until(lambda: slow.running == 3)
        async with await Client.connect(addr) as late:
            with pytest.raises(RpcError) as err:
                await sleep_call(late, 0)
            assert err.value.code == Code.RESOURCE_EXHAUSTED and "agent.ttrpc_max_inflight_total" in err.value.message
            await asyncio.gather(*busy)
            assert server.admission.inflight == 0
            assert (await sleep_call(late, 0)).service == "0"
        for c in clients:
            await c.close()
    finally:
        await server.close()


async def test_inflight_bytes(tmp_sock_dir):
    server, addr, slow = await serve(tmp_sock_dir, Limits(max_inflight_bytes=20_000))
    try:
        async with await Client.connect(addr) as c:
            held = asyncio.create_task(sleep_call(c, 0.5, payload_pad=15_000))
            await wait_until(lambda: slow.running == 1)
            assert server.admission.inflight_bytes > 15_000
            with pytest.raises(RpcError) as err:
                await sleep_call(c, 0, payload_pad=10_000)
            assert err.value.code == Code.RESOURCE_EXHAUSTED and "agent.ttrpc_max_inflight_bytes" in err.value.message
            assert (await sleep_call(c, 0, payload_pad=1_000)).service.strip() == "0"  # small ones still fit
            await held
            assert server.admission.inflight_bytes == 0
    finally:
        await server.close()


async def test_oversized_request_is_refused_on_its_stream_and_the_stream_goes_on(tmp_sock_dir):
    server, addr, _ = await serve(tmp_sock_dir, Limits(max_message=8192))
    loop = asyncio.get_running_loop()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        await loop.sock_connect(s, addr[len("unix://"):])
        big = ttrpc_pb2.Request(service=HEALTH, method="Check", payload=b"x" * 9000).SerializeToString()
        ok = ttrpc_pb2.Request(service=HEALTH, method="Check").SerializeToString()
        await loop.sock_sendall(s, framing.encode_frame(1, 1, 0, big, max_length=1 << 20)
                                + framing.encode_frame(3, 1, 0, ok))
        decoder, got = framing.FrameDecoder(), {}
        async with asyncio.timeout(5):
            while len(got) < 2:
                for sid, _t, _f, _n, payload in decoder.feed(await loop.sock_recv(s, 65536)):
                    got[sid] = ttrpc_pb2.Response.FromString(payload).status
        assert got[1].code == Code.INVALID_ARGUMENT  # as the upstream (Rust) agent answers it
        assert got[1].message == f"message length {len(big)} exceed maximum message size of 8192"
        assert got[3].code == 0
        s.close()
    finally:
        await server.close()


async def test_a_peer_that_never_reads_cannot_grow_the_agent(tmp_sock_dir):
    """Replies a peer does not read stay bounded: the server stops reading its requests.
    (Found by this test: 37 MB queued after 400k Health checks; fixed in the write path.)"""
    server, addr, _ = await serve(tmp_sock_dir, Limits())
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, addr[len("unix://"):])
        body = ttrpc_pb2.Request(service=HEALTH, method="Check").SerializeToString()
        batch = b"".join(framing.encode_frame(2 * i + 1, 1, 0, body) for i in range(20_000))
        for _ in range(10):  # 200k requests, ~5 MB of replies if nothing pushed back
            try:
                await asyncio.wait_for(loop.sock_sendall(s, batch), 1.0)
            except TimeoutError:
                break  # the server stopped reading us: that is the pushback wanted
        conn = next(iter(server._connections))
        queued = conn.transport.get_write_buffer_size()
        harness.figure("non-reading peer", queued_reply_bytes=queued)
        assert queued < 4 << 20, f"{queued} bytes of replies queued for a peer that does not read"
    finally:
        s.close()
        await server.close()


@pytest.mark.root
async def test_the_agent_applies_the_configured_limits():
    agent = harness.AgentUnderTest(cmdline="agent.ttrpc_max_connections=2", log_level="info")
    try:
        await agent.wait_ready()
        await asyncio.sleep(0.3)  # the readiness probe's connection is gone from the server's count
        a, b = await agent.connect(), await agent.connect()
        assert await check(a) == 1 and await check(b) == 1
        c = await agent.connect()
        with pytest.raises(RpcError) as err:
            await check(c)
        assert err.value.code == Code.RESOURCE_EXHAUSTED and "agent.ttrpc_max_connections" in err.value.message
        for x in (a, b, c):
            await x.close()
        await asyncio.sleep(0.2)
        assert "too many connections" in agent.log()  # the warning
    finally:
        agent.stop()
        agent.cleanup()
