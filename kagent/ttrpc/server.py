"""The ttRPC server: many connections, many concurrent requests on each.

Layers (as in asyncpg): the sans-I/O FrameDecoder turns bytes into frames;
``Connection`` (an asyncio.Protocol) validates frames and starts one task per
request; handlers are plain ``async def handler(request, ctx) -> response``.
Responses are queued and flushed once per loop iteration, so every frame is
written whole (one writer per connection) and pipelined replies share a write.

Bad input never takes the agent down: a bad frame gets an error status on its
own stream and the connection goes on; only bytes that cannot be a ttRPC
stream (an unknown frame type) close that one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message

from kagent import log as klog
from kagent.protocols import ttrpc_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.addresses import Address, parse, resolve_serial
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import status_of
from kagent.ttrpc.transports import listen, open_serial

_log = klog.get_logger("ttrpc")

Handler = Callable[[Any, "Context"], Awaitable[Message]]
# An interceptor wraps every call: ``await interceptor(ctx, request, call_next)`` returns the
# response (it may refuse, replace the response, time it, trace it).  The first one listed is
# the outermost.  Used by tracing, metrics and the agent policy.
CallNext = Callable[[], Awaitable[Message]]
Interceptor = Callable[["Context", Message, CallNext], Awaitable[Message]]


@dataclass(frozen=True)
class Route:
    """What the server needs to serve one method."""

    request_type: type[Message]
    handler: Handler


@dataclass
class Context:
    """Per-request facts a handler may use."""

    connection: Connection
    stream_id: int
    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None  # loop.time() at which the caller gives up

    @property
    def request_name(self) -> str:
        """The request message's name, e.g. "CreateContainerRequest" (policy rules use it)."""
        return self.connection.server.routes[(self.service, self.method)].request_type.DESCRIPTOR.name


def encode_ok(stream_id: int, payload: bytes) -> bytes:
    """A successful Response frame, encoded by hand (status {} then payload).

    Equivalent to Response(status=Status(), payload=payload) — an explicit
    empty status as upstream's server sends — without a protobuf round trip.
    """
    n = len(payload)
    prefix = bytearray(b"\x0a\x00")
    if n:
        prefix.append(0x12)
        while n >= 0x80:
            prefix.append((n & 0x7F) | 0x80)
            n >>= 7
        prefix.append(n)
    body = bytes(prefix) + payload
    return framing.encode_header(len(body), stream_id, framing.TYPE_RESPONSE, 0) + body


def encode_error(stream_id: int, code: int, message: str) -> bytes:
    resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=int(code), message=message))
    body = resp.SerializeToString()
    return framing.encode_header(len(body), stream_id, framing.TYPE_RESPONSE, 0) + body


class Connection(asyncio.Protocol):
    """One client byte stream."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._decoder = framing.FrameDecoder(server.max_message)
        self._tasks: dict[int, asyncio.Task] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "")
        self.server._connections.add(self)
        _log.debug("connection opened", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except Exception as exc:  # the decoder only fails on a broken stream
            self._abort(f"undecodable stream: {exc}")
            return
        for stream_id, msg_type, _flags, length, payload in frames:
            if msg_type == framing.TYPE_REQUEST:
                self._on_request(stream_id, length, payload)
            elif msg_type == framing.TYPE_DATA:
                # No AgentService or Health method streams; say so on that stream.
                if not self._tasks.get(stream_id):
                    self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, "data frame for a stream that is not open"))
            else:
                self._abort(f"frame of type {msg_type} from a client (garbage on the stream?)")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for task in list(self._tasks.values()):
            task.cancel()
        self._out.clear()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)
        _log.debug("connection closed", peer=self.peer, inflight=len(self._tasks))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- requests ---------------------------------------------------------

    def _on_request(self, stream_id: int, length: int, payload: bytes | None) -> None:
        if payload is None:
            self.send(encode_error(
                stream_id, Code.INVALID_ARGUMENT,
                f"message length {length} exceed maximum message size of {self.server.max_message}"))
            return
        if stream_id % 2 == 0:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} must be odd"))
            return
        if stream_id in self._tasks:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} is already in use"))
            return
        try:
            req = ttrpc_pb2.Request.FromString(payload)
        except DecodeError as exc:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"cannot decode request envelope: {exc}"))
            return
        route, code, msg = self.server.route(req.service, req.method)
        if route is None:
            self.send(encode_error(stream_id, code, msg))
            return
        try:
            request = route.request_type.FromString(req.payload)
        except DecodeError as exc:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT,
                                   f"cannot decode {route.request_type.DESCRIPTOR.name}: {exc}"))
            return
        loop = asyncio.get_running_loop()
        ctx = Context(self, stream_id, req.service, req.method)
        if req.metadata:
            for kv in req.metadata:
                ctx.metadata.setdefault(kv.key, []).append(kv.value)
        if req.timeout_nano > 0:
            ctx.deadline = loop.time() + req.timeout_nano / 1e9
        task = loop.create_task(self._run(route, request, ctx))
        self._tasks[stream_id] = task

    async def _run(self, route: Route, request: Message, ctx: Context) -> None:
        started = time.perf_counter()
        code = Code.OK
        try:
            try:
                call = self.server.chain(route, request, ctx)
                if ctx.deadline is not None:
                    async with asyncio.timeout_at(ctx.deadline):
                        response = await call()
                else:
                    response = await call()
                body = response.SerializeToString()
                if len(body) + 64 > self.server.max_message:
                    code = Code.INVALID_ARGUMENT
                    self.send(encode_error(ctx.stream_id, code,
                                           f"response of {len(body)} bytes exceeds the maximum message size"))
                else:
                    self.send(encode_ok(ctx.stream_id, body))
            except asyncio.CancelledError:
                code = Code.CANCELLED
                if self.transport is None or self.transport.is_closing():
                    raise  # the client went away: nothing to answer
                if self.server.closing:
                    self.send(encode_error(ctx.stream_id, Code.UNAVAILABLE, "agent is shutting down"))
                    raise
                raise
            except Exception as exc:
                code, message, unexpected = status_of(exc)
                if unexpected:
                    _log.error("handler failed", rpc=ctx.method, exc_info=exc)
                self.send(encode_error(ctx.stream_id, code, message))
        finally:
            self._tasks.pop(ctx.stream_id, None)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("rpc", rpc=ctx.method, stream_id=ctx.stream_id, code=code.name,
                           duration_ms=round((time.perf_counter() - started) * 1000, 3))

    # -- writing ----------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a whole frame; frames queued in one loop iteration go out in one write."""
        if self.transport is None or self.transport.is_closing():
            return
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if not out or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self) -> None:
        """Wait while the peer is not reading (the transport's buffer is full)."""
        await self._can_write.wait()

    def _abort(self, reason: str) -> None:
        _log.warning("closing connection", peer=self.peer, reason=reason)
        if self.transport is not None:
            self.transport.close()

    @property
    def inflight(self) -> int:
        return len(self._tasks)


class Server:
    """Serve routes on any number of addresses."""

    def __init__(self, routes: Mapping[tuple[str, str], Route], *,
                 max_message: int = framing.MESSAGE_LENGTH_MAX,
                 interceptors: Sequence[Interceptor] = ()) -> None:
        self.routes = dict(routes)
        self.interceptors = list(interceptors)
        self.services = {svc for svc, _ in self.routes}
        self.max_message = max_message
        self.closing = False
        self._connections: set[Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._serial_tasks: list[asyncio.Task] = []
        self._socket_files: list[str] = []

    def chain(self, route: Route, request: Message, ctx: Context) -> CallNext:
        """The handler call wrapped by the interceptors, outermost first."""
        def call() -> Awaitable[Message]:
            return route.handler(request, ctx)

        for interceptor in reversed(self.interceptors):
            call = functools.partial(interceptor, ctx, request, call)
        return call

    def route(self, service: str, method: str) -> tuple[Route | None, Code, str]:
        found = self.routes.get((service, method))
        if found is not None:
            return found, Code.OK, ""
        if service not in self.services:
            return None, Code.INVALID_ARGUMENT, f"{service} service does not exist"
        return None, Code.UNIMPLEMENTED, f"{service}/{method} method is not known"

    async def start(self, address: str | Address) -> None:
        addr = parse(address) if isinstance(address, str) else address
        if addr.scheme == "serial":
            self._serial_tasks.append(asyncio.get_running_loop().create_task(self._serve_serial(addr)))
            return
        self._listeners.append(await listen(addr, lambda: Connection(self)))
        if addr.scheme == "unix" and not addr.abstract:
            self._socket_files.append(addr.path)
        _log.info("listening", address=str(addr))

    async def _serve_serial(self, addr: Address) -> None:
        """A serial port is one connection; EOF means the host is not there: reopen and wait."""
        announced = False
        while not self.closing:
            try:
                path = resolve_serial(addr.path)
                _, proto = await open_serial(path, lambda: Connection(self))
                conn: Connection = proto  # type: ignore[assignment]
                if not announced:
                    _log.info("listening", address=str(addr), device=path)
                    announced = True
                await conn.closed
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                _log.warning("serial port unavailable, retrying", address=str(addr), error=str(exc))
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(0.1)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop accepting, cancel handlers, close connections, remove socket files."""
        self.closing = True
        for lst in self._listeners:
            lst.close()
        for task in self._serial_tasks:
            task.cancel()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        for task in self._serial_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for lst in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(lst.wait_closed(), 2.0)
        for path in self._socket_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._listeners.clear()
        self._socket_files.clear()
