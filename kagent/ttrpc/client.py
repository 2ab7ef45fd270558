"""An asyncio ttRPC client (used by kagent-ctl, the tests and the benchmarks).

Stream ids are odd and increase by two, as every ttRPC client does; many calls
may be in flight on one connection and replies are matched by stream id.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

from google.protobuf.message import DecodeError, Message

from kagent.protocols import ttrpc_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.addresses import Address, parse
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError
from kagent.ttrpc.transports import dial


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_message: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = framing.FrameDecoder(max_message)
        self.pending: dict[int, asyncio.Future] = {}
        self.lost: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except Exception as exc:
            self._fail_all(RpcError(Code.UNAVAILABLE, f"undecodable stream from server: {exc}"))
            if self.transport:
                self.transport.close()
            return
        for stream_id, msg_type, _flags, length, payload in frames:
            fut = self.pending.pop(stream_id, None)
            if fut is None or fut.done():
                continue  # a reply to a call we gave up on
            if msg_type != framing.TYPE_RESPONSE:
                fut.set_exception(RpcError(Code.INTERNAL, f"unexpected frame type {msg_type} on stream {stream_id}"))
            elif payload is None:
                fut.set_exception(RpcError(Code.RESOURCE_EXHAUSTED,
                                           f"response of {length} bytes exceeds the maximum message size"))
            else:
                fut.set_result(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        self._fail_all(RpcError(Code.UNAVAILABLE, f"connection to the agent lost: {self.lost}"))

    def _fail_all(self, err: RpcError) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)


class Client:
    """A connection to a ttRPC server."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol, address: Address) -> None:
        self._transport = transport
        self._protocol = protocol
        self._ids = itertools.count(1, 2)
        self.address = address

    @classmethod
    async def connect(cls, address: str | Address, *, timeout: float = 10.0, retry_interval: float = 0.05,
                      max_message: int = framing.MESSAGE_LENGTH_MAX) -> Client:
        """Dial, retrying until ``timeout`` (an agent may still be starting)."""
        addr = parse(address) if isinstance(address, str) else address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                transport, protocol = await dial(addr, lambda: _ClientProtocol(max_message))
                return cls(transport, protocol, addr)
            except (ConnectionError, FileNotFoundError, OSError) as exc:
                if loop.time() + retry_interval > deadline:
                    raise ConnectionError(f"cannot connect to {addr}: {exc}") from exc
                await asyncio.sleep(retry_interval)

    async def call_raw(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
                       metadata: Mapping[str, str] | None = None) -> bytes:
        """Send one request; return the response payload or raise RpcError."""
        if self._protocol.lost is not None:
            raise RpcError(Code.UNAVAILABLE, f"connection to the agent lost: {self._protocol.lost}")
        stream_id = next(self._ids)
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=int(timeout * 1e9) if timeout else 0)
        if metadata:
            req.metadata.extend(ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata.items())
        frame = framing.encode_frame(stream_id, framing.TYPE_REQUEST, 0, req.SerializeToString())
        fut = asyncio.get_running_loop().create_future()
        self._protocol.pending[stream_id] = fut
        self._transport.write(frame)
        try:
            if timeout:
                # A little grace so the server's own DEADLINE_EXCEEDED usually wins.
                body = await asyncio.wait_for(fut, timeout + 0.5)
            else:
                body = await fut
        except TimeoutError:
            raise RpcError(Code.DEADLINE_EXCEEDED, f"no response to {method} within {timeout}s") from None
        finally:
            self._protocol.pending.pop(stream_id, None)
        try:
            resp = ttrpc_pb2.Response.FromString(body)
        except DecodeError as exc:
            raise RpcError(Code.INTERNAL, f"undecodable response envelope: {exc}") from None
        if resp.HasField("status") and resp.status.code != 0:
            raise RpcError(resp.status.code, resp.status.message)
        return resp.payload

    async def call(self, service: str, method: str, request: Message, response_type: type[Message], *,
                   timeout: float | None = None, metadata: Mapping[str, str] | None = None) -> Message:
        body = await self.call_raw(service, method, request.SerializeToString(), timeout=timeout,
                                   metadata=metadata)
        try:
            return response_type.FromString(body)
        except DecodeError as exc:
            raise RpcError(Code.INTERNAL, f"undecodable {response_type.DESCRIPTOR.name}: {exc}") from None

    def write_raw(self, data: bytes) -> None:
        """Put bytes on the wire as they are (tests of the server's input handling)."""
        self._transport.write(data)

    @property
    def closed(self) -> bool:
        return self._protocol.lost is not None

    async def close(self) -> None:
        self._transport.close()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
