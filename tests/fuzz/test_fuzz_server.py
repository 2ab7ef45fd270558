"""Fuzz target: the ttRPC server over a real unix socket.

Each example opens a connection and writes a random stream — requests with good,
odd, even, reused and huge stream ids, undecodable envelopes and payloads, unknown
services and methods, DATA frames, oversized frames (partly sent), garbage, frames
of types a client never sends, a truncated frame at the end — cut into random
chunks.  Properties: every request frame gets exactly one answer on its own
stream (unless a frame that cannot belong to a ttRPC stream closed the
connection first); the server stays up and a fresh client is served; once the
connection is gone its slot and in-flight counts are back to zero; nothing
raises in the event loop.  Small limits (max message 1 KiB, 3 requests in
flight) make the RESOURCE_EXHAUSTED paths common.

The slowloris cases are deterministic tests: a peer that sends a header and then
nothing is closed after the frame timeout; one that keeps sending whole frames is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile

import pytest
import reliability_harness as harness
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from kagent.protocols import health_pb2, ttrpc_pb2
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc import framing
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.limits import Limits
from kagent.ttrpc.server import Route, Server

HEALTH = "grpc.Health"
MAX = 1024
LIMITS = Limits(max_connections=8, max_inflight=3, max_inflight_total=6, max_inflight_bytes=4096,
                max_message=MAX, frame_timeout=5.0)


class Probe:
    SERVICE = "test.Probe"

    async def echo(self, request: health_pb2.CheckRequest, ctx):
        return request

    async def nap(self, request: health_pb2.CheckRequest, ctx):
        await asyncio.sleep(0.002)
        return request

    async def fail(self, request, ctx):
        raise RuntimeError("expected failure")

    async def big(self, request, ctx):
        return health_pb2.CheckRequest(service="x" * (MAX + 10))


def routes() -> dict:
    p = Probe()
    r = build_routes([HealthService()])
    for name, fn in (("Echo", p.echo), ("Nap", p.nap), ("Fail", p.fail), ("Big", p.big)):
        r[("test.Probe", name)] = Route(health_pb2.CheckRequest, fn)
    return r


class LoopServer:
    """A server in a loop of our own, driven example by example (hypothesis is synchronous)."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.dir = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
        self.path = os.path.join(self.dir, "s.sock")
        self.loop = uvloop.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self.server = Server(routes(), limits=limits)
        self.run(self.server.start("unix://" + self.path))

    def run(self, coro, timeout: float = 30):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def srv():
    s = LoopServer()
    yield s
    s.close()
    assert not s.errors, s.errors


# --- the random stream ------------------------------------------------------------------------

SERVICES = st.sampled_from([HEALTH, "test.Probe", "grpc.AgentService", "nope", ""])
METHODS = st.sampled_from(["Check", "Version", "Echo", "Nap", "Fail", "Big", "CreateContainer", "", "x" * 300])
PAYLOADS = st.one_of(st.just(b""), st.binary(max_size=64),
                     st.text(max_size=40).map(lambda s: health_pb2.CheckRequest(service=s).SerializeToString()))
SIDS = st.one_of(st.integers(0, 40), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2]))


@st.composite
def frames(draw):
    """(bytes, kind, stream id): kind "req" must be answered, "data" may be, "fatal" closes."""
    kind = draw(st.sampled_from(["req"] * 6 + ["badenv", "data", "oversize", "garbage", "fatal"]))
    sid = draw(SIDS)
    if kind == "req":
        req = ttrpc_pb2.Request(service=draw(SERVICES), method=draw(METHODS), payload=draw(PAYLOADS),
                                timeout_nano=draw(st.sampled_from([0, 1, 10**6, 10**9, 2**63 - 1])))
        for k, v in draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3)):
            req.metadata.add(key=k, value=v)
        return framing.encode_header(len(body := req.SerializeToString()), sid, 1, draw(st.integers(0, 255))) + body, "req", sid
    if kind == "badenv":
        body = draw(st.binary(max_size=MAX))
        return framing.encode_header(len(body), sid, 1, 0) + body, "req", sid
    if kind == "data":
        body = draw(st.binary(max_size=64))
        return framing.encode_header(len(body), sid, 3, draw(st.integers(0, 255))) + body, "data", sid
    if kind == "oversize":
        # only whole oversized frames: a partial one would swallow what follows
        n = draw(st.integers(MAX + 1, MAX + 3000))
        return framing.encode_header(n, sid, 1, 0) + draw(st.binary(min_size=n, max_size=n)), "req", sid
    if kind == "garbage":
        # a header of a valid-typed frame followed by exactly its length of junk
        body = draw(st.binary(max_size=100))
        mtype = draw(st.sampled_from([1, 3]))
        return framing.encode_header(len(body), sid, mtype, 0) + body, ("req" if mtype == 1 else "data"), sid
    mtype = draw(st.sampled_from([0, 2, 4, 255]))
    return framing.encode_header(0, sid, mtype, 0), "fatal", sid


def expectations(parts):
    must: dict[int, int] = {}
    may: dict[int, int] = {}
    fatal = False
    for _, kind, sid in parts:
        if kind == "fatal":
            fatal = True
            break
        if kind == "req":
            must[sid] = must.get(sid, 0) + 1
        else:
            may[sid] = may.get(sid, 0) + 1
    return must, may, fatal


async def exchange(path: str, data: bytes, cuts: list[int], tail: bytes, must: dict, may: dict,
                   fatal: bool) -> dict[int, list]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    got: dict[int, list] = {}
    try:
        await loop.sock_connect(sock, path)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for a, b in zip(points, points[1:], strict=False):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await loop.sock_sendall(sock, data[a:b])
        if tail:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await loop.sock_sendall(sock, tail)
        decoder = framing.FrameDecoder()
        want = sum(must.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10 if not fatal else 2):
                while fatal or sum(min(len(got.get(s, [])), n) for s, n in must.items()) < want:
                    try:
                        chunk = await loop.sock_recv(sock, 65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    for sid, mtype, _f, _n, payload in decoder.feed(chunk):
                        assert mtype == framing.TYPE_RESPONSE
                        got.setdefault(sid, []).append(ttrpc_pb2.Response.FromString(payload))
                # a moment for answers that should not come (extra ones would be caught)
                if not fatal:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.02):
                            chunk = await loop.sock_recv(sock, 65536)
                            for sid, _t, _f, _n, payload in decoder.feed(chunk):
                                got.setdefault(sid, []).append(ttrpc_pb2.Response.FromString(payload))
    finally:
        sock.close()
    return got


async def healthy(path: str) -> None:
    async with await Client.connect("unix://" + path, timeout=5) as c:
        r = await c.call(HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse, timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def drained(server: Server) -> None:
    for _ in range(500):
        a = server.admission
        if server.connections == 0 and a.connections == 0 and a.inflight == 0 and a.inflight_bytes == 0:
            return
        await asyncio.sleep(0.01)
    a = server.admission
    raise AssertionError(f"not back to zero: connections={server.connections}/{a.connections} "
                         f"inflight={a.inflight} bytes={a.inflight_bytes}")


@harness.fuzz_settings(250)
@given(parts=st.lists(frames(), max_size=10), cuts=st.lists(st.integers(0, 4096), max_size=10),
       tail=st.one_of(st.just(b""), st.binary(min_size=1, max_size=9),
                      st.builds(lambda n: struct.pack(">IIBB", n, 1, 1, 0), st.integers(1, MAX))))
def test_every_request_frame_gets_one_answer(srv, parts, cuts, tail):
    harness.record("server.random_streams")
    must, may, fatal = expectations(parts)
    data = b"".join(p for p, _, _ in parts)
    got = srv.run(exchange(srv.path, data, cuts, tail, must, may, fatal))
    if not fatal:
        for sid, n in must.items():
            answers = len(got.get(sid, []))
            assert n <= answers <= n + may.get(sid, 0), (sid, n, got.get(sid))
        for sid, answers in got.items():
            assert sid in must or sid in may, f"answer on stream {sid} that nobody asked on"
            for resp in answers:
                if resp.status.code == Code.RESOURCE_EXHAUSTED:
                    harness.record("server.resource_exhausted_answers")
    srv.run(healthy(srv.path))
    srv.run(drained(srv.server))
    assert not srv.errors, srv.errors


# --- slowloris --------------------------------------------------------------------------------


async def _closed_within(sock: socket.socket, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_header_then_nothing_is_closed_after_the_frame_timeout(tmp_sock_dir):
    server = Server(routes(), limits=Limits(frame_timeout=0.3))
    path = os.path.join(tmp_sock_dir, "s.sock")
    await server.start("unix://" + path)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for partial in (framing.encode_header(4000, 1, 1, 0) + b"x" * 100,  # a header and a bit
                        framing.encode_header(4000, 1, 1, 0),  # a header alone
                        b"\x00\x00\x00"):  # not even a header
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, path)
            await loop.sock_sendall(s, partial)
            socks.append(s)
        started = loop.time()
        for s in socks:
            assert await _closed_within(s, 3.0)
        assert loop.time() - started < 2.0
        await healthy(path)
        await drained(server)
    finally:
        for s in socks:
            s.close()
        await server.close()


async def test_a_busy_connection_is_not_cut_by_the_frame_timeout(tmp_sock_dir):
    """Many frames, each completed in time (one of them trickled in over 0.2 s), on a
    connection that lives several frame timeouts: never closed."""
    server = Server(routes(), limits=Limits(frame_timeout=0.3))
    path = os.path.join(tmp_sock_dir, "s.sock")
    await server.start("unix://" + path)
    try:
        async with await Client.connect("unix://" + path) as c:
            for i in range(12):
                if i == 5:
                    body = ttrpc_pb2.Request(service=HEALTH, method="Check").SerializeToString()
                    frame = framing.encode_frame(1001, framing.TYPE_REQUEST, 0, body)
                    for k in range(0, len(frame), 4):
                        c.write_raw(frame[k:k + 4])
                        await asyncio.sleep(0.2 / (len(frame) / 4))
                r = await c.call(HEALTH, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
                                 timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
                await asyncio.sleep(0.06)
            assert not c.closed
    finally:
        await server.close()
