"""Records between the agent's processes (supervisor, zygote, workers).

Each peer pair shares a SOCK_SEQPACKET socketpair: one JSON object per record,
file descriptors riding along as SCM_RIGHTS.  ``send``/``recv`` are blocking
(zygote and workers are single-threaded, loop-free processes); ``Channel`` is
the supervisor's asyncio side, with request/reply matching by ``id`` and a
callback for unsolicited events (exits, OOM, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from kagent.errors import ResourceExhausted

MAX_RECORD = 1 << 20  # what one recvmsg takes: an inline record is far smaller (INLINE_MAX)
MAX_FDS = 16
# A SEQPACKET record must fit the sender's socket buffer (~208 KiB by default: EMSGSIZE
# beyond it), and a spec may be as large as a ttRPC message (agent.ttrpc_max_message_size).
# A record longer than INLINE_MAX travels in a memfd sent with it; the record on the socket
# then says {"_large": length} and keeps the fields that route it (ROUTING).
INLINE_MAX = 64 << 10
MAX_LARGE = 256 << 20
ROUTING = ("id", "reply", "op", "event")


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def encode(obj: dict[str, Any], fds: Sequence[int] = ()) -> tuple[bytes, list[int], int | None]:
    """(record, fds to send, a memfd made for a large record: the sender closes it once sent)."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) <= INLINE_MAX:
        return data, list(fds), None
    if len(data) > MAX_LARGE:
        raise ValueError(f"ipc record of {len(data)} bytes exceeds {MAX_LARGE}")
    memfd = os.memfd_create("kagent-ipc", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view):]
    except BaseException:
        os.close(memfd)
        raise
    head = {key: obj[key] for key in ROUTING if key in obj}
    head["_large"] = len(data)
    return json.dumps(head, separators=(",", ":")).encode(), [*fds, memfd], memfd


def send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data, fds, memfd = encode(obj, fds)
    try:
        _sendmsg(sock, data, fds)
    finally:
        if memfd is not None:
            os.close(memfd)


def _sendmsg(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("record is not an object")
        if "_large" in obj:
            obj = _read_large(obj, fds)
    except ValueError:
        _close(fds)
        raise
    return obj, fds


def _read_large(head: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """The record a large record's head stands for, read from its memfd (the last fd, taken
    off ``fds`` and closed)."""
    size = head["_large"]
    if not fds or not isinstance(size, int) or not 0 <= size <= MAX_LARGE:
        raise ValueError(f"malformed large ipc record {head!r}")
    memfd = fds.pop()
    try:
        data = os.pread(memfd, size + 1, 0)
    except OSError as exc:
        raise ValueError(f"cannot read a large ipc record: {exc}") from exc
    finally:
        os.close(memfd)
    if len(data) != size:
        raise ValueError(f"large ipc record of {len(data)} bytes, announced {size}")
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("record is not an object")
    return obj


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


class FdsLost(ResourceExhausted, ValueError):
    """A record arrived without (all of) its SCM_RIGHTS fds: the receiver is at its fd limit
    (the kernel drops what it cannot install and sets MSG_CTRUNC).  The fds that did arrive
    are closed.  ``record`` is the record itself, so that its sender can be answered.  A
    ValueError too, as every record that cannot be delivered whole."""

    def __init__(self, record: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.record = record


def _record(data: bytes, fds: list[int], flags: int, receiver: str,
            sender: str) -> tuple[dict[str, Any], list[int]]:
    """The record of one recvmsg, checked: whole, an object, with every fd it was sent with."""
    if flags & socket.MSG_TRUNC:
        _close(fds)
        raise ValueError("ipc record truncated")
    if flags & socket.MSG_CTRUNC:
        _close(fds)  # before decoding: a large record's memfd may be among the lost
        head, _ = _decode_head(data)
        raise FdsLost(head, f"{receiver} ran out of file descriptors (Too many open files): "
                            f"the fds sent with a record from {sender} did not arrive")
    return _decode(data, fds)


def _decode_head(data: bytes) -> tuple[dict[str, Any], list[int]]:
    """The record as it came on the socket (a large one's head, not read)."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("record is not an object")
    return obj, []


def recv(sock: socket.socket, receiver: str = "this process") -> tuple[dict[str, Any], list[int]] | None:
    """One record and its fds; None at EOF (the peer is gone).  ValueError for a record that
    cannot be delivered (FdsLost when its fds did not all arrive)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_RECORD, MAX_FDS)
    if not data and not fds and not flags & socket.MSG_CTRUNC:
        return None
    return _record(data, fds, flags, receiver, "its peer")


class ChannelClosed(ConnectionError):
    pass


class Channel:
    """The supervisor's end of a socketpair, on the event loop."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict, list[int]], None] | None = None,
                 name: str = "peer") -> None:
        self.sock = sock
        self.name = name
        sock.setblocking(False)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.on_event = on_event
        self._send_lock = asyncio.Lock()  # held by records waiting for room in the socket
        self.closed = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_RECORD, MAX_FDS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(exc)
                return
            if not data and not fds and not flags & socket.MSG_CTRUNC:
                self._close(None)
                return
            try:
                obj, fds = _record(data, fds, flags, "the agent", self.name)
            except FdsLost as lost:
                # A reply whose fds did not all arrive is no reply: fail its request (the fds
                # that came are closed).  Events carry no fds, so there is nothing else to lose.
                fut = self._pending.pop(lost.record.get("reply", 0), None)
                if fut is not None and not fut.done():
                    fut.set_exception(lost)
                continue
            except ValueError:
                continue  # a malformed record from a peer is dropped, never fatal
            reply_to = obj.get("reply")
            if reply_to is not None:
                fut = self._pending.pop(reply_to, None)
                if fut is not None and not fut.done():
                    fut.set_result((obj, fds))
                else:
                    _close(fds)
            elif self.on_event is not None:
                self.on_event(obj, fds)
            else:
                _close(fds)

    async def request(self, obj: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """Send a request and wait for the record whose ``reply`` matches its ``id``."""
        if self.closed.done():
            raise ChannelClosed(f"{self.name} is gone")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        data, fds, memfd = encode({**obj, "id": rid}, fds)
        try:
            try:
                await self._send(data, fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(f"{self.name} is gone: {exc}") from None
            finally:
                if memfd is not None:
                    os.close(memfd)
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        """Send one record; while the socket's buffer is full (a peer busy with earlier
        requests), wait until it is writable rather than fail.  Records that had to wait go
        out one at a time and in order (the loop keeps one writer callback per fd)."""
        if not self._send_lock.locked():
            try:
                _sendmsg(self.sock, data, fds)
                return
            except BlockingIOError:
                pass
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            while True:
                try:
                    _sendmsg(self.sock, data, fds)
                    return
                except BlockingIOError:
                    pass
                if self.closed.done():
                    raise ChannelClosed(f"{self.name} is gone")
                writable = loop.create_future()
                loop.add_writer(self.sock.fileno(), _set_once, writable)
                try:
                    await asyncio.wait([writable, self.closed], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_writer(self.sock.fileno())

    def _close(self, exc: Exception | None) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        err = ChannelClosed(f"{self.name} is gone" + (f": {exc}" if exc else ""))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(exc)

    def close(self) -> None:
        self._close(None)
        self.sock.close()


def _set_once(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
