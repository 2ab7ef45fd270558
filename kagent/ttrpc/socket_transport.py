"""The server's own socket transport: it alone reads and writes a connection's socket.

Why not the loop's transports: a ReadStdout reply is a frame header followed by
bytes spliced straight from the container's pipe into the socket, and a uvloop
transport allows no second writer on its fd.  So the server owns the socket:

- reads go into one buffer shared by every connection (the frame decoder copies
  what it keeps), handed to ``protocol.data_received`` as a memoryview;
- writes leave in order from one queue whose entries are bytes, *borrowed*
  buffers (a callback releases them once they are on the wire) and splice jobs
  (a header, then ``n`` bytes moved pipe → relay pipe → socket by splice(2), so
  the frame reaches the socket in one write).  An entry is finished before the
  next one starts, so frames never interleave;
- whatever the socket does not take at once waits for EPOLLOUT; past
  ``HIGH_WATER`` bytes held in memory the protocol is paused (``pause_writing``;
  the server then stops reading requests too) until the queue falls under
  ``LOW_WATER``.  Spliced bytes wait in the pipe, not here, so a peer that stops
  reading stalls the container's writer, not the agent's memory.

It presents the asyncio.Transport surface the server's protocol uses
(``write``, ``writelines``, ``close``, ``abort``, ``is_closing``,
``get_extra_info``, ``get_write_buffer_size``) plus ``write_borrowed`` and
``splice``; callbacks reach the protocol exactly as from a loop transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

READ_SIZE = 256 << 10
IOV_MAX = 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = 1031
RELAY_SIZE = 1 << 20

#: one read buffer for every connection of the process: reads are synchronous and
#: the decoder copies what it keeps, so nothing refers to it after data_received
_read_buffer = bytearray(READ_SIZE)
_read_view = memoryview(_read_buffer)

Done = Callable[[BaseException | None], None]


class SpliceJob:
    """A frame whose body waits in a pipe: ``head`` bytes, then ``count`` bytes from ``fd``."""

    __slots__ = ("done", "fd", "head", "relayed", "remaining")

    def __init__(self, head: bytes, fd: int, count: int, done: Done) -> None:
        self.head = head
        self.fd = fd
        self.remaining = count  # still in the source pipe
        self.relayed = -1  # bytes in the relay pipe not yet in the socket; -1: not started
        self.done = done


class _Release:
    """A queue marker: every byte queued before it is on the wire; call ``fn``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


class SocketTransport(asyncio.Transport):
    HIGH_WATER = 1 << 20
    LOW_WATER = 256 << 10

    def __init__(self, sock: socket.socket, protocol: asyncio.Protocol,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__({"socket": sock, "peername": _peername(sock), "sockname": _sockname(sock)})
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._loop = loop or asyncio.get_running_loop()
        self._queue: collections.deque[Any] = collections.deque()
        self._buffered = 0  # bytes held in the queue (not spliced ones: those wait in the pipe)
        self._writer_armed = False
        self._draining = False
        self._paused = False  # writing: the protocol was told to pause
        self._read_paused = False
        self._closing = False  # close() called: finish writing, then close
        self._closed = False
        self._relay: tuple[int, int] | None = None  # see _splice
        self._sendmsg = sock.sendmsg
        self._recv_into = sock.recv_into

    def start(self) -> None:
        self._protocol.connection_made(self)
        self._loop.add_reader(self._fd, self._on_readable)

    # -- reading ------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            n = self._recv_into(_read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort(exc)
            return
        if n == 0:
            # The peer shut its side: it reads nothing more either, so drop what is queued.
            self._abort(None)
            return
        self._protocol.data_received(_read_view[:n])  # type: ignore[arg-type]  # the decoder takes buffers

    # -- writing ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue whole parts; bytearrays and memoryviews are copied if the socket leaves them."""
        if self._closing or self._closed:
            return
        parts = list_of_data if type(list_of_data) is list else list(list_of_data)
        if not self._queue and not self._draining and len(parts) <= IOV_MAX:
            # The common case (small replies, an idle socket): one sendmsg, nothing queued.
            try:
                sent = self._sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._abort(exc)
                return
            if sent == sum(map(len, parts)):
                return
            parts = _after(parts, sent)
        start = len(self._queue)
        for p in parts:
            if len(p):
                self._queue.append(p if type(p) is bytes else bytes(p))
                self._buffered += len(p)
        if len(self._queue) > start:
            self._after_queueing()

    def write_borrowed(self, parts: Sequence[bytes | memoryview], release: Callable[[], None]) -> None:
        """Queue parts that refer to a buffer the caller reuses after ``release()``.

        ``release`` runs once they are all on the wire, or when the connection ends.
        Nothing is copied: the caller keeps the buffer aside until then.
        """
        if self._closing or self._closed:
            release()
            return
        for p in parts:
            if len(p):
                self._queue.append(p)
                self._buffered += len(p)
        self._queue.append(_Release(release))
        self._after_queueing()

    def splice(self, head: bytes, fd: int, count: int, done: Done) -> None:
        """Queue one frame: ``head`` (its header) then ``count`` bytes spliced from the pipe ``fd``.

        The caller guarantees the pipe holds ``count`` bytes that nobody else
        reads meanwhile.  ``done(None)`` once they are all in the socket,
        ``done(exc)`` if the connection ends first (the frame is then cut, and so
        is the connection).
        """
        if self._closing or self._closed:
            done(ConnectionResetError(errno.ECONNRESET, "connection closed"))
            return
        self._queue.append(SpliceJob(head, fd, count, done))
        self._buffered += len(head)
        self._after_queueing()

    def _after_queueing(self) -> None:
        if not self._writer_armed and not self._draining:
            self._drain()
            if self._queue and not self._closed:
                self._loop.add_writer(self._fd, self._on_writable)
                self._writer_armed = True
        if not self._paused and self._buffered > self.HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        self._drain()
        if self._closed:
            return
        if not self._queue:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
            if self._closing:
                self._finish(None)
                return
        if self._paused and self._buffered <= self.LOW_WATER:
            self._paused = False
            self._protocol.resume_writing()

    def _drain(self) -> None:
        self._draining = True  # a release or done callback that writes only appends
        try:
            self._drain_queue()
        finally:
            self._draining = False

    def _drain_queue(self) -> None:
        """Write queue entries in order until the queue is empty or the socket is full."""
        queue = self._queue
        while queue and not self._closed:
            head = queue[0]
            kind = type(head)
            if kind is SpliceJob:
                if not self._splice(head):
                    return
                queue.popleft()
                head.done(None)
                continue
            if kind is _Release:
                queue.popleft()
                head.fn()
                continue
            parts: list[Any] = []
            for item in queue:
                kind = type(item)
                if kind is SpliceJob or kind is _Release or len(parts) == IOV_MAX:
                    break
                parts.append(item)
            try:
                sent = self._sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._abort(exc)
                return
            self._buffered -= sent
            for _ in range(len(parts)):
                size = len(queue[0])
                if sent < size:  # a short write: the socket is full
                    if sent:
                        queue[0] = memoryview(queue[0])[sent:]
                    return
                queue.popleft()
                sent -= size

    def _splice(self, job: SpliceJob) -> bool:
        """Move what the socket takes; True when the job is complete.

        The header and the data go through a relay pipe: the header is written
        into it, the data spliced pipe → relay (page references, no copy), and
        the relay spliced into the socket, so the frame reaches the socket in one
        write and the reader wakes once, not once for the header and once for
        the data (in a VM each wake-up of another CPU is an IPI, and that is
        most of the cost of a 32 KiB read).
        """
        relay = self._relay or self._make_relay()
        if relay is None:
            return self._splice_direct(job)
        try:
            if job.relayed < 0:
                os.write(relay[1], job.head)  # the relay is empty: a small write always fits
                self._buffered -= len(job.head)
                job.relayed = len(job.head)
            while job.remaining or job.relayed:
                if job.remaining:
                    try:
                        n = os.splice(job.fd, relay[1], job.remaining, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1  # the relay is full: empty it into the socket first
                    if n == 0:
                        raise ConnectionAbortedError(errno.EPIPE, "spliced pipe ran dry")
                    if n > 0:
                        job.remaining -= n
                        job.relayed += n
                if job.relayed:
                    try:
                        n = os.splice(relay[0], self._fd, job.relayed, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        return False  # the socket is full
                    job.relayed -= n
        except InterruptedError:
            return False
        except OSError as exc:
            self._abort(exc)
            return False
        return True

    def _splice_direct(self, job: SpliceJob) -> bool:
        """Without a relay pipe: the header, then splice pipe → socket."""
        try:
            while job.relayed < 0:
                n = self._sock.send(job.head)
                self._buffered -= n
                job.head = job.head[n:]
                if not job.head:
                    job.relayed = 0
            while job.remaining:
                n = os.splice(job.fd, self._fd, job.remaining, flags=SPLICE_FLAGS)
                if n == 0:
                    raise ConnectionAbortedError(errno.EPIPE, "spliced pipe ran dry")
                job.remaining -= n
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._abort(exc)
            return False
        return True

    def _make_relay(self) -> tuple[int, int] | None:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        # As large as a container pipe may be, so one round moves a whole reply.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, RELAY_SIZE)
        self._relay = (r, w)
        return self._relay

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.LOW_WATER, self.HIGH_WATER

    # -- closing ------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Stop reading; close once what is queued has been written."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._queue:
            self._finish(None)

    def abort(self) -> None:
        self._abort(None)

    def _abort(self, exc: Exception | None) -> None:
        if not self._closed:
            self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        self._closed = self._closing = True
        self._loop.remove_reader(self._fd)
        if self._writer_armed:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
        pending, self._queue = self._queue, collections.deque()
        self._buffered = 0
        self._sock.close()
        if self._relay is not None:
            os.close(self._relay[0])
            os.close(self._relay[1])
            self._relay = None
        lost = exc or ConnectionResetError(errno.ECONNRESET, "connection closed")
        for item in pending:  # whoever lent a buffer or a pipe gets it back
            if type(item) is SpliceJob:
                item.done(lost)
            elif type(item) is _Release:
                item.fn()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- reading controls -------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop reading (the protocol pauses while its peer does not read its replies)."""
        if not self._closing and not self._read_paused:
            self._read_paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._closing and self._read_paused:
            self._read_paused = False
            self._loop.add_reader(self._fd, self._on_readable)

    def is_reading(self) -> bool:
        return not self._closing and not self._read_paused


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _sockname(sock: socket.socket) -> Any:
    try:
        return sock.getsockname()
    except OSError:
        return None


def _after(parts: Sequence[bytes | bytearray | memoryview], sent: int) -> list[bytes | bytearray | memoryview]:
    """What of ``parts`` is left after the first ``sent`` bytes went out."""
    out: list[bytes | bytearray | memoryview] = []
    for p in parts:
        n = len(p)
        if sent >= n:
            sent -= n
            continue
        out.append(memoryview(p)[sent:] if sent else p)
        sent = 0
    return out
