"""Handlers marked @eager: started in the read path, continued by a task if they wait."""

from __future__ import annotations

import asyncio
import os

import pytest

from kagent.errors import NotFound
from kagent.protocols import health_pb2
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.server import Route, Server, eager
from kagent.ttrpc.status import RpcError


class Eager:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task | None] = []
        self.cancelled = 0
        self.release = asyncio.Event()

    @eager
    async def now(self, req, ctx):
        self.tasks.append(asyncio.current_task())
        return health_pb2.CheckRequest(service="now:" + req.service)

    @eager
    async def later(self, req, ctx):
        self.tasks.append(asyncio.current_task())  # None: not yet in a task
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.tasks.append(asyncio.current_task())  # the task that took over
        async with asyncio.timeout(5):  # needs a current task: there is one now
            await asyncio.sleep(0)
        return health_pb2.CheckRequest(service="later:" + req.service)

    @eager
    async def fails(self, req, ctx):
        raise NotFound(f"no {req.service}")


async def serve(sock_dir: str, probe: Eager) -> tuple[Server, str]:
    routes = {("t.E", name): Route(health_pb2.CheckRequest, getattr(probe, name)) for name in ("now", "later", "fails")}
    server = Server(routes)
    addr = "unix://" + os.path.join(sock_dir, "e.sock")
    await server.start(addr)
    assert server.eager == set(routes)
    return server, addr


async def call(client: Client, method: str, arg: str, timeout: float | None = 5) -> str:
    resp = await client.call("t.E", method, health_pb2.CheckRequest(service=arg), health_pb2.CheckRequest,
                             timeout=timeout)
    return resp.service


async def test_eager_handlers_finish_without_a_task_and_continue_in_one(tmp_sock_dir):
    probe = Eager()
    server, addr = await serve(tmp_sock_dir, probe)
    try:
        async with await Client.connect(addr) as client:
            assert await call(client, "now", "a") == "now:a"
            assert probe.tasks == [None]
            waiting = asyncio.create_task(call(client, "later", "b", timeout=None))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert (await asyncio.gather(*(call(client, "now", str(i)) for i in range(50))))[-1] == "now:49"
            probe.release.set()
            assert await waiting == "later:b"
            assert probe.tasks[1] is None and isinstance(probe.tasks[-1], asyncio.Task)
            with pytest.raises(RpcError) as err:
                await call(client, "fails", "thing")
            assert err.value.code == Code.NOT_FOUND and "no thing" in err.value.message
    finally:
        await server.close()


async def test_eager_handler_that_waits_gets_its_deadline_and_disconnects(tmp_sock_dir):
    probe = Eager()
    server, addr = await serve(tmp_sock_dir, probe)
    try:
        async with await Client.connect(addr) as client:
            with pytest.raises(RpcError) as err:
                await call(client, "later", "slow", timeout=0.1)
            assert err.value.code == Code.DEADLINE_EXCEEDED
            assert probe.cancelled == 1
        client = await Client.connect(addr)
        pending = asyncio.create_task(call(client, "later", "gone", timeout=None))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(RpcError):
            await pending
        for _ in range(100):
            if probe.cancelled == 2:
                break
            await asyncio.sleep(0.01)
        assert probe.cancelled == 2
    finally:
        await server.close()


async def test_thousands_of_pipelined_requests_in_one_read(tmp_sock_dir):
    """More replies from one read than one sendmsg can carry (IOV_MAX): all arrive, in order."""
    from kagent.protocols import ttrpc_pb2
    from kagent.ttrpc import framing

    probe = Eager()
    server, addr = await serve(tmp_sock_dir, probe)
    loop = asyncio.get_running_loop()
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr[len("unix://"):])
        n = 3000
        body = ttrpc_pb2.Request(service="t.E", method="now",
                                 payload=health_pb2.CheckRequest(service="x").SerializeToString()).SerializeToString()
        await loop.sock_sendall(sock, b"".join(framing.encode_frame(2 * i + 1, framing.TYPE_REQUEST, 0, body)
                                               for i in range(n)))
        decoder, got = framing.FrameDecoder(), []
        async with asyncio.timeout(10):
            while len(got) < n:
                got += decoder.feed(await loop.sock_recv(sock, 1 << 16))
        assert [f[0] for f in got] == [2 * i + 1 for i in range(n)]
        assert all(ttrpc_pb2.Response.FromString(f[4]).status.code == 0 for f in got)
    finally:
        sock.close()
        await server.close()


def test_handlers_that_cannot_suspend_run_eagerly_without_a_mark():
    from kagent.ttrpc.server import runs_eagerly

    async def plain(req, ctx):
        return req

    async def waits(req, ctx):
        await asyncio.sleep(0)

    async def times_out(req, ctx):
        async with asyncio.timeout(1):
            pass

    async def only_defines_an_awaiting_helper(req, ctx):
        async def helper():
            await asyncio.sleep(0)

        return helper

    def not_a_coroutine(req, ctx):
        return req

    @eager
    async def marked(req, ctx):
        await asyncio.sleep(0)

    assert runs_eagerly(plain) and runs_eagerly(only_defines_an_awaiting_helper) and runs_eagerly(marked)
    assert not runs_eagerly(waits) and not runs_eagerly(times_out) and not runs_eagerly(not_a_coroutine)
    assert runs_eagerly(HealthCheckHolder().Check)


class HealthCheckHolder:
    async def Check(self, req, ctx):
        return req


async def test_context_variables_set_by_an_eager_handler_do_not_leak(tmp_sock_dir):
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("span", default="none")
    seen: list[str] = []
    gate = asyncio.Event()

    @eager
    async def traced(req, ctx):
        seen.append(var.get())
        var.set(req.service)
        if req.service == "wait":
            await gate.wait()
        seen.append(var.get())
        return req

    server = Server({("t.C", "traced"): Route(health_pb2.CheckRequest, traced)})
    addr = "unix://" + os.path.join(tmp_sock_dir, "c.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as client:
            async def one(name: str) -> str:
                r = await client.call("t.C", "traced", health_pb2.CheckRequest(service=name), health_pb2.CheckRequest)
                return r.service

            waiting = asyncio.create_task(one("wait"))
            await asyncio.sleep(0.05)
            assert await one("a") == "a"
            gate.set()
            assert await waiting == "wait"
            assert await one("b") == "b"
        # every request started from "none"; the suspended one kept its own value
        assert seen == ["none", "none", "a", "wait", "none", "b"]
    finally:
        await server.close()
