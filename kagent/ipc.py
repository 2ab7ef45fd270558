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

MAX_RECORD = 1 << 20
MAX_FDS = 16


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_RECORD:
        raise ValueError(f"ipc record of {len(data)} bytes exceeds {MAX_RECORD}")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("record is not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return obj, fds


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One record and its fds; None at EOF (the peer is gone)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_RECORD, MAX_FDS)
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("ipc record truncated")
    return _decode(data, fds)


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
            if not data and not fds:
                self._close(None)
                return
            try:
                obj, fds = _decode(data, fds)
            except ValueError:
                continue  # a malformed record from a peer is dropped, never fatal
            reply_to = obj.get("reply")
            if reply_to is not None:
                fut = self._pending.pop(reply_to, None)
                if fut is not None and not fut.done():
                    fut.set_result((obj, fds))
                else:
                    for fd in fds:
                        os.close(fd)
            elif self.on_event is not None:
                self.on_event(obj, fds)
            else:
                for fd in fds:
                    os.close(fd)

    async def request(self, obj: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """Send a request and wait for the record whose ``reply`` matches its ``id``."""
        if self.closed.done():
            raise ChannelClosed(f"{self.name} is gone")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            send(self.sock, {**obj, "id": rid}, fds)
            return await fut
        finally:
            self._pending.pop(rid, None)

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
