"""The ttRPC server: many connections, many concurrent requests on each.

Layers (as in asyncpg): the sans-I/O FrameDecoder turns bytes into frames;
``Connection`` (an asyncio.Protocol) validates frames and runs one handler per
request; handlers are plain ``async def handler(request, ctx) -> response``.

The server owns its sockets (kagent.ttrpc.socket_transport): it accepts,
reads and writes them itself, so that a ReadStdout reply can be a frame header
followed by bytes spliced from a pipe into the socket.  Replies are queued and
written together at the end of each read or loop iteration; every frame is
written whole and in order (one writer per connection), so pipelined replies
share a write and never interleave.  A handler marked ``@eager`` is started in
the read path and, if it finishes without waiting, costs no task at all.

Bad input never takes the agent down: a bad frame gets an error status on its
own stream and the connection goes on; only bytes that cannot be a ttRPC
stream (an unknown frame type) close that one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dis
import errno
import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from google.protobuf.message import DecodeError, Message

from kagent import log as klog
from kagent.protocols import ttrpc_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.addresses import Address, parse, resolve_serial
from kagent.ttrpc.codes import Code
from kagent.ttrpc.limits import Admission, ConnectionGuard, Limits
from kagent.ttrpc.socket_transport import SocketTransport
from kagent.ttrpc.status import status_of
from kagent.ttrpc.transports import SerialPort, _bind_unix, _bind_vsock

_log = klog.get_logger("ttrpc")

Handler = Callable[[Any, "Context"], Awaitable[Message]]
# An interceptor wraps every call: ``await interceptor(ctx, request, call_next)`` returns the
# response (it may refuse, replace the response, time it, trace it).  The first one listed is
# the outermost.  Used by tracing, metrics and the agent policy.  For an eager route (see
# ``eager``) interceptors start in the read path too, so the same rule holds for them: no
# ``asyncio.timeout()``/TaskGroup before their first real wait.  A response may be a RawReply
# (ReadStdout from a pipe): an interceptor that replaces it must ``discard()`` (or ``drop()``) it.
CallNext = Callable[[], Awaitable[Message]]
Interceptor = Callable[["Context", Message, CallNext], Awaitable[Message]]


class Observer(Protocol):
    """Told when each request starts and how it ends (metrics), with no coroutine of its own:
    an interceptor would add a layer to every call, cheap RPCs included."""

    def begin(self, ctx: Context) -> None: ...

    def end(self, ctx: Context, code: Code) -> None: ...


@dataclass(frozen=True)
class Route:
    """What the server needs to serve one method."""

    request_type: type[Message]
    handler: Handler


_NO_METADATA: Mapping[str, list[str]] = MappingProxyType({})


class Context:
    """Per-request facts a handler may use (a plain slotted class: one is made per request)."""

    __slots__ = ("connection", "stream_id", "service", "method", "metadata", "deadline", "started")

    def __init__(self, connection: Connection, stream_id: int, service: str, method: str,
                 metadata: Mapping[str, list[str]] = _NO_METADATA, deadline: float | None = None,
                 started: float = 0.0) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.service = service
        self.method = method
        self.metadata = metadata  # read-only; the request's ttRPC metadata, key → values
        self.deadline = deadline  # loop.time() at which the caller gives up
        self.started = started  # time.perf_counter() when the request was read

    @property
    def request_name(self) -> str:
        """The request message's name, e.g. "CreateContainerRequest" (policy rules use it)."""
        return self.connection.server.routes[(self.service, self.method)].request_type.DESCRIPTOR.name


def eager(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Mark a handler that the server may start in the read path, before any task exists.

    A request whose handler finishes without suspending (a ReadStdout with
    output already in the pipe) is then answered with no task at all, which is
    most of the cost of a small RPC.  If it suspends, a task takes over where it
    stopped.  Until its first suspension such a handler has no current task, so
    it must not enter ``asyncio.timeout()``, a TaskGroup or anything else that
    needs ``asyncio.current_task()`` before its first await that really waits.
    A handler whose body has no ``await`` at all (Health.Check) needs no mark:
    it cannot suspend, so the server starts it eagerly by itself.
    """
    handler.kagent_eager = True  # type: ignore[attr-defined]
    return handler


_SUSPENDING_OPS = frozenset({"GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "SEND",
                             "YIELD_VALUE", "END_ASYNC_FOR"})


def runs_eagerly(handler: Any) -> bool:
    """Whether the server starts ``handler`` in the read path: marked @eager, or unable to suspend."""
    if getattr(handler, "kagent_eager", False):
        return True
    fn = getattr(handler, "__func__", handler)
    if not inspect.iscoroutinefunction(fn):
        return False
    try:
        return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(fn))
    except TypeError:
        return False


class RawReply:
    """A response the handler encodes itself, returned instead of a protobuf message.

    The server calls exactly one of ``send`` (write one whole Response frame for
    ``stream_id`` on the connection, or raise before writing anything) or
    ``discard`` (the reply will not be sent: give back what it holds).  An
    interceptor that replaces such a response must ``discard`` it.  Used for
    ReadStdout replies spliced straight from a pipe (kagent.stdio).
    """

    __slots__ = ()

    def send(self, connection: Connection, stream_id: int) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        pass


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_OK_EMPTY = b"\x0a\x00"  # Response{status: {}}
_OK_SMALL = [b"\x0a\x00\x12" + bytes([n]) for n in range(128)]


_encode_frame = framing.encode_frame
_NO_LIMIT = 0xFFFFFFFF  # encode_ok's callers check the size themselves


def ok_prefix(payload_len: int) -> bytes:
    """The bytes of a successful Response before a payload of ``payload_len`` bytes."""
    if payload_len < 128:
        return _OK_SMALL[payload_len] if payload_len else _OK_EMPTY
    return b"\x0a\x00\x12" + varint(payload_len)


def encode_ok(stream_id: int, payload: bytes) -> bytes:
    """A successful Response frame, encoded by hand (status {} then payload).

    Equivalent to Response(status=Status(), payload=payload) — an explicit
    empty status as upstream's server sends — without a protobuf round trip.
    """
    n = len(payload)
    prefix = (_OK_SMALL[n] if n else _OK_EMPTY) if n < 128 else ok_prefix(n)
    return _encode_frame(stream_id, framing.TYPE_RESPONSE, 0, prefix + payload, _NO_LIMIT)


def encode_error(stream_id: int, code: int, message: str) -> bytes:
    resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=int(code), message=message))
    body = resp.SerializeToString()
    return framing.encode_header(len(body), stream_id, framing.TYPE_RESPONSE, 0) + body


class Connection(asyncio.Protocol):
    """One client byte stream.

    Frames go out whole and in order: small replies are queued and written
    together once the current read (or loop iteration) is done; a large reply
    (``send_borrowed``, ``send_spliced``) first flushes that queue, then goes
    behind it in the transport's own queue.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: Any = None
        self.peer = ""
        self._decoder = framing.FrameDecoder(server.max_message)
        self._tasks: dict[int, asyncio.Task] = {}
        self._out: list[bytes] = []
        self._reading = False  # inside data_received: it flushes when done
        self._debug = _log.isEnabledFor(logging.DEBUG)
        self._flush_scheduled = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "")
        # Over max_connections the guard refuses it: first request answered, then closed.
        self._guard = ConnectionGuard(self, self.server.admission)
        # requests are bounded by the limits' max_message; a stalled partial frame closes it
        self._decoder = self._guard.watch(framing.FrameDecoder(self.server.limits.max_message))
        if self._guard.admitted:
            self.server._connections.add(self)
        _log.debug("connection opened", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except Exception as exc:  # the decoder only fails on a broken stream
            self._abort(f"undecodable stream: {exc}")
            return
        self._reading = True
        self._debug = _log.isEnabledFor(logging.DEBUG)  # once per read, not per request
        try:
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
        finally:
            self._reading = False
            if self._out:
                self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.close()
        self.server._connections.discard(self)
        for task in list(self._tasks.values()):
            task.cancel()
        self._out.clear()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)
        _log.debug("connection closed", peer=self.peer, inflight=len(self._tasks))

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests too, or a peer
        # that only sends would make us queue replies without bound.
        self._can_write.clear()
        with contextlib.suppress(NotImplementedError, AttributeError):
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        with contextlib.suppress(NotImplementedError, AttributeError):
            self.transport.resume_reading()

    # -- requests ---------------------------------------------------------

    def _on_request(self, stream_id: int, length: int, payload: bytes | None) -> None:
        clear = self._guard.clear(length, payload, len(self._tasks))
        refusal = None if clear else self._guard.refuse(length, payload)  # refused connection, oversized frame
        if refusal is not None:
            # An oversized frame is a bad request, as the upstream agent answers it
            # (INVALID_ARGUMENT); a connection over the limit is RESOURCE_EXHAUSTED.
            code = Code.INVALID_ARGUMENT if payload is None and self._guard.refusal is None \
                else Code.RESOURCE_EXHAUSTED
            self.send(encode_error(stream_id, code, refusal))
            return
        if not stream_id & 1:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} must be odd"))
            return
        if stream_id in self._tasks:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"stream id {stream_id} is already in use"))
            return
        busy = None if clear else self._guard.busy(length)  # in-flight limits
        if busy is not None:
            self.send(encode_error(stream_id, Code.RESOURCE_EXHAUSTED, busy))
            return
        try:
            req = ttrpc_pb2.Request.FromString(payload)
        except DecodeError as exc:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT, f"cannot decode request envelope: {exc}"))
            return
        server = self.server
        key = (req.service, req.method)
        route = server.routes.get(key)
        if route is None:
            _, code, msg = server.route(req.service, req.method)
            self.send(encode_error(stream_id, code, msg))
            return
        try:
            request = route.request_type.FromString(req.payload)
        except DecodeError as exc:
            self.send(encode_error(stream_id, Code.INVALID_ARGUMENT,
                                   f"cannot decode {route.request_type.DESCRIPTOR.name}: {exc}"))
            return
        ctx = Context(self, stream_id, req.service, req.method, started=time.perf_counter())
        if req.metadata:
            metadata: dict[str, list[str]] = {}
            for kv in req.metadata:
                metadata.setdefault(kv.key, []).append(kv.value)
            ctx.metadata = metadata
        if req.timeout_nano > 0:
            ctx.deadline = self._loop.time() + req.timeout_nano / 1e9
        for observer in server.observers:
            observer.begin(ctx)
        coro: Any = route.handler(request, ctx) if not server.interceptors else server.call(route, request, ctx)
        if key in server.eager:
            # In a context of its own, as a task would have: a context variable set by the
            # handler or an interceptor (a tracing span) must not leak into the next request.
            context = contextvars.copy_context()
            try:
                waiting = context.run(coro.send, None)
            except StopIteration as done:
                self._respond(ctx, done.value)
                return
            except Exception as exc:
                self._fail(ctx, exc)
                return
            task = self._loop.create_task(self._run(_Resume(coro, waiting), ctx), context=context)
        else:
            task = self._loop.create_task(self._run(coro, ctx))
        self._tasks[stream_id] = task
        self._guard.track(task, length)

    async def _run(self, call: Awaitable[Any], ctx: Context) -> None:
        response = None
        try:
            if ctx.deadline is not None:
                async with asyncio.timeout_at(ctx.deadline):
                    response = await call
            else:
                response = await call
        except asyncio.CancelledError:
            if isinstance(response, RawReply):
                response.discard()  # made, then cancelled on the way out: give back what it holds
            self._ended(ctx, Code.CANCELLED)
            if self.transport is None or self.transport.is_closing():
                raise  # the client went away: nothing to answer
            if self.server.closing:
                self.send(encode_error(ctx.stream_id, Code.UNAVAILABLE, "agent is shutting down"))
            raise
        except Exception as exc:
            if isinstance(response, RawReply):
                response.discard()  # e.g. the deadline expired just as it was made
            self._fail(ctx, exc)
            return
        finally:
            self._tasks.pop(ctx.stream_id, None)
        self._respond(ctx, response)

    def _respond(self, ctx: Context, response: Any) -> None:
        code = Code.OK
        if type(response) is not RawReply and not isinstance(response, RawReply):
            body = response.SerializeToString()
            if len(body) + 64 <= self.server.max_message:
                self.send(encode_ok(ctx.stream_id, body))
            else:
                code = Code.INVALID_ARGUMENT
                self.send(encode_error(ctx.stream_id, code,
                                       f"response of {len(body)} bytes exceeds the maximum message size"))
        else:
            if self.transport is None or self.transport.is_closing():
                response.discard()
                self._ended(ctx, Code.CANCELLED)
                return
            try:
                response.send(self, ctx.stream_id)
            except Exception as exc:
                self._fail(ctx, exc)
                return
        self._ended(ctx, code)

    def _fail(self, ctx: Context, exc: Exception) -> None:
        code, message, unexpected = status_of(exc)
        if unexpected:
            _log.error("handler failed", rpc=ctx.method, exc_info=exc)
        self.send(encode_error(ctx.stream_id, code, message))
        self._ended(ctx, code)

    def _ended(self, ctx: Context, code: Code) -> None:
        """Every request that reached its handler ends here exactly once."""
        for observer in self.server.observers:
            observer.end(ctx, code)
        if self._debug:
            _log.debug("rpc", rpc=ctx.method, stream_id=ctx.stream_id, code=code.name,
                       duration_ms=round((time.perf_counter() - ctx.started) * 1000, 3))

    # -- writing ----------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a whole frame; frames queued in one read or loop iteration go out in one write."""
        if self.transport is None or self.transport.is_closing():
            return
        self._out.append(frame)
        if not self._reading and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if not out or self.transport is None or self.transport.is_closing():
            return
        self.transport.writelines(out)

    @property
    def can_splice(self) -> bool:
        """Whether this connection's transport can take bytes spliced from a pipe."""
        return isinstance(self.transport, SocketTransport)

    def send_borrowed(self, parts: list[bytes | memoryview], release: Callable[[], None]) -> None:
        """One frame made of ``parts``, some viewing a buffer the caller lends until ``release()``."""
        transport = self.transport
        if transport is None or transport.is_closing():
            release()
            return
        out, self._out = self._out, []
        if isinstance(transport, SocketTransport):
            transport.write_borrowed(out + parts, release)
        else:
            try:
                transport.writelines(out + [bytes(p) for p in parts])
            finally:
                release()

    def send_spliced(self, head: bytes, fd: int, count: int,
                     done: Callable[[BaseException | None], None]) -> None:
        """One frame: ``head`` then ``count`` bytes spliced from the pipe ``fd`` (see can_splice)."""
        transport = self.transport
        if not isinstance(transport, SocketTransport) or transport.is_closing():
            done(ConnectionResetError("connection closed"))
            return
        if self._out:
            out, self._out = self._out, []
            transport.writelines(out)
        transport.splice(head, fd, count, done)

    async def drain(self) -> None:
        """Wait while the peer is not reading (the transport's buffer is full)."""
        await self._can_write.wait()

    @property
    def writing_paused(self) -> bool:
        return not self._can_write.is_set()

    def _abort(self, reason: str) -> None:
        _log.warning("closing connection", peer=self.peer, reason=reason)
        if self.transport is not None:
            self.transport.close()

    @property
    def inflight(self) -> int:
        return len(self._tasks)


class _Resume:
    """Await a coroutine that was started eagerly and suspended on ``waiting``.

    Awaited inside a task, it passes the coroutine's pending future up to the
    task (so the task sleeps on it, and cancelling the task cancels it), then
    keeps driving the coroutine exactly as the task itself would.
    """

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self):
        coro, waiting = self.coro, self.waiting
        self.coro = self.waiting = None
        while True:
            try:
                yield waiting
            except BaseException as exc:  # thrown into the task (cancellation): pass it on
                try:
                    waiting = coro.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                waiting = coro.send(None)
            except StopIteration as done:
                return done.value


class _Listener:
    """Accept connections on a bound, listening socket, in the loop."""

    BATCH = 64
    BACKOFF = 0.1  # seconds the listener rests when the process is out of descriptors

    def __init__(self, server: Server, sock: socket.socket, address: Address) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._resting: asyncio.TimerHandle | None = None
        self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(self.BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays in the backlog and the listener stays readable:
                    # stop watching it a moment instead of spinning on accept().
                    self._loop.remove_reader(self._fd)
                    self._resting = self._loop.call_later(self.BACKOFF, self._wake)
                _log.warning("accept failed", address=str(self.address), error=str(exc))
                return
            try:
                SocketTransport(conn, Connection(self.server), self._loop).start()
            except Exception:
                conn.close()
                raise

    def _wake(self) -> None:
        self._resting = None
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._resting is not None:
            self._resting.cancel()
            self._resting = None
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            self.sock.close()


class Server:
    """Serve routes on any number of addresses."""

    def __init__(self, routes: Mapping[tuple[str, str], Route], *,
                 max_message: int = framing.MESSAGE_LENGTH_MAX,
                 interceptors: Sequence[Interceptor] = (), observers: Sequence[Observer] = (),
                 limits: Limits | None = None) -> None:
        self.routes = dict(routes)
        self.interceptors = list(interceptors)
        self.observers = tuple(observers)
        self.services = {svc for svc, _ in self.routes}
        #: routes whose handler is marked @eager (started in the read path)
        self.eager = {key for key, r in self.routes.items() if runs_eagerly(r.handler)}
        #: resource bounds on what peers send (kagent.ttrpc.limits); ``max_message`` (which
        #: also bounds responses) is their request size limit when none are given
        self.limits = limits if limits is not None else Limits(max_message=max_message)
        self.admission = Admission(self.limits)
        self.max_message = max_message
        self.closing = False
        self._connections: set[Connection] = set()
        self._listeners: list[_Listener] = []
        self._serial_tasks: list[asyncio.Task] = []
        self._socket_files: list[str] = []

    def call(self, route: Route, request: Message, ctx: Context) -> Coroutine[Any, Any, Message]:
        """The handler's coroutine, wrapped by the interceptors (outermost first)."""
        interceptors = self.interceptors
        if not interceptors:
            return route.handler(request, ctx)  # type: ignore[return-value]
        if len(interceptors) == 1:  # the usual case (the policy), without a partial per request
            return interceptors[0](ctx, request, lambda: route.handler(request, ctx))  # type: ignore[return-value]
        return self.chain(route, request, ctx)()  # type: ignore[return-value]

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
        if addr.scheme == "unix":
            sock = _bind_unix(addr)
        elif addr.scheme == "vsock":
            sock = _bind_vsock(addr)
        else:
            raise ValueError(f"cannot listen on {addr}: use unix://, vsock:// or serial://")
        self._listeners.append(_Listener(self, sock, addr))
        if addr.scheme == "unix" and not addr.abstract:
            self._socket_files.append(addr.path)
        _log.info("listening", address=str(addr))

    async def _serve_serial(self, addr: Address) -> None:
        """A serial port is one connection at a time.  The port stays open from one host to
        the next (closing it would drop the next host's first request, see SerialPort); it is
        reopened only when it fails (EIO) or cannot be opened yet."""
        announced = False
        while not self.closing:
            try:
                port = SerialPort(resolve_serial(addr.path))
            except OSError as exc:
                _log.warning("serial port unavailable, retrying", address=str(addr), error=str(exc))
                await asyncio.sleep(1.0)
                continue
            if not announced:
                _log.info("listening", address=str(addr), device=port.path)
                announced = True
            try:
                while not self.closing:
                    first = await port.wait_for_host()
                    conn = Connection(self)
                    transport = port.connect(conn, first)
                    await conn.closed
                    if transport.error is not None:
                        raise transport.error
            except OSError as exc:
                _log.warning("serial port failed, reopening", address=str(addr), error=str(exc))
                await asyncio.sleep(0.1)
            finally:
                port.close()

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
        for path in self._socket_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._listeners.clear()
        self._socket_files.clear()
        await asyncio.sleep(0)  # let the closed connections' connection_lost run
