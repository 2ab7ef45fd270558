"""Serving a process's stdio to the host, in the supervisor's event loop.

The parent ends of the pipes (or the pty master) arrive from the worker with
SCM_RIGHTS; ReadStdout/ReadStderr/WriteStdin work on them directly.

Read semantics follow upstream: one read of up to ``len`` bytes; empty data
means EOF — every writer closed, or the process exited and nothing more came
within the drain window (a daemonised grandchild may hold the pipe open
forever).  Nothing is buffered here: a host that does not read leaves the
bytes in the pipe, so a flooding container blocks on its own writes and the
agent's memory stays flat.

A ReadStdout reply never holds the output in a Python object.  Once the pipe
has output, the handler returns a ``PipeReply`` (a ttRPC RawReply) that owns
the stream until it is on the wire, and the connection sends it one of two ways:

- splice: the frame header, sized by FIONREAD, then splice(2) pipe → socket;
  the bytes never enter user space;
- copy: ``readv`` into a preallocated buffer lent to the connection until the
  socket has taken it (no allocation per read: an ``os.read`` of 1 MiB maps
  fresh pages every call, and that, not copying, is what costs).

``MODE`` picks one ("splice" unless ``KAGENT_STDIO=copy``; bench/stdio.py
measures both); a pty, or a connection that cannot splice (a serial port),
always copies.  The host sees the same bytes either way.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import struct
import termios

from kagent.protocols import agent_pb2
from kagent.ttrpc import framing
from kagent.ttrpc.server import Connection, RawReply, ok_prefix, varint

EXIT_DRAIN = 0.5  # seconds a read waits for more output after the process exited
MAX_READ = framing.MESSAGE_LENGTH_MAX - 64  # a ttRPC reply cannot carry more (with its prefixes)
MODE = "copy" if os.environ.get("KAGENT_STDIO") == "copy" else "splice"

_EMPTY = agent_pb2.ReadStreamResponse()

#: Stdio bytes moved, by (direction, path): "out" (to the host) or "in" (from it), "copy"
#: (through user space) or "splice" (page references, pipe ⇄ socket); the direct streams of
#: kagent.passfd count here too.  Plain ints on the hot path; metrics read them at scrape time.
BYTES: dict[tuple[str, str], int] = {(d, p): 0 for d in ("out", "in") for p in ("copy", "splice")}


def fionread(fd: int) -> int:
    """Bytes waiting in a pipe or pty (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


async def _wait_fd(fd: int, writable: bool, timeout: float | None = None) -> bool:
    """Wait until ``fd`` is ready; False on timeout."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(True))
    try:
        if timeout is None:
            await fut
            return True
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
    finally:
        remove(fd)


class _Buffers:
    """Read buffers lent to connections until the socket has taken their bytes.

    Anonymous mappings of MAX_READ: only the pages a read touches become
    resident, and they stay mapped for the next read (no page faults then).
    """

    KEEP = 4

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        return self._free.pop() if self._free else mmap.mmap(-1, MAX_READ)

    def give(self, buf: mmap.mmap) -> None:
        if len(self._free) < self.KEEP:
            self._free.append(buf)


_buffers = _Buffers()


def reply_head(stream_id: int, count: int) -> bytes:
    """Frame header + Response prefix + ReadStreamResponse prefix for ``count`` bytes of data."""
    data_prefix = b"\x0a" + varint(count)
    payload_len = len(data_prefix) + count
    prefix = ok_prefix(payload_len)
    header = framing.encode_header(len(prefix) + payload_len, stream_id, framing.TYPE_RESPONSE, 0)
    return b"".join((header, prefix, data_prefix))


class PipeReply(RawReply):
    """A ReadStreamResponse whose data is still in the pipe; it holds the stream until sent."""

    __slots__ = ("ready", "size", "stream")

    def __init__(self, stream: OutputStream, ready: int, size: int) -> None:
        self.stream = stream
        self.ready = ready  # bytes FIONREAD saw, all ours (the stream is held)
        self.size = size  # what the host asked for

    def send(self, connection: Connection, stream_id: int) -> None:
        stream = self.stream
        if MODE == "splice" and not stream.pty and connection.can_splice:
            count = min(self.ready, self.size)
            connection.send_spliced(reply_head(stream_id, count), stream.fd, count, stream._spliced)
            BYTES["out", "splice"] += count
            return
        buf = _buffers.take()
        try:
            view = memoryview(buf)[: self.size]
            try:
                count = os.readv(stream.fd, [view])
            except OSError as exc:
                if not (exc.errno == errno.EIO and stream.pty):
                    raise
                count = 0  # the slave side hung up under us: an empty (EOF) reply
                stream.eof = True
        except BaseException:
            _buffers.give(buf)
            stream._release()
            raise
        stream._release()
        connection.send_borrowed([reply_head(stream_id, count), view[:count]], lambda: _buffers.give(buf))
        BYTES["out", "copy"] += count

    def discard(self) -> None:
        """Not sent: the bytes stay in the pipe for the next read."""
        self.stream._release()

    def drop(self) -> int:
        """Not sent, and the bytes it announced are thrown away (read out of the pipe)."""
        stream = self.stream
        try:
            return len(os.read(stream.fd, min(self.ready, self.size)))
        except (BlockingIOError, InterruptedError):
            return 0
        finally:
            stream._release()


class OutputStream:
    """stdout, stderr or a pty master, read on the host's demand."""

    def __init__(self, fd: int, exited: asyncio.Future, *, pty: bool = False) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.pty = pty
        self.eof = False
        self._exited = exited
        self._lock = asyncio.Lock()
        self._closing = asyncio.get_running_loop().create_future()  # set by close()
        self._closed = False

    async def reply(self, size: int, connection: Connection | None = None) -> agent_pb2.ReadStreamResponse | PipeReply:
        """The ReadStdout/ReadStderr reply for a read of up to ``size`` bytes (empty data is EOF).

        It waits for output; a PipeReply holds the stream until the connection
        has sent it, so concurrent readers of one stream take turns and no
        reader takes bytes a header has already announced.
        """
        size = max(0, min(size, MAX_READ))
        await self._lock.acquire()
        try:
            got = await self._ready(size)
            # A host that does not read its replies: leave the output in the pipe (checked
            # last, with the stream held, so waiters woken together do not all go on).
            while type(got) is int and connection is not None and connection.writing_paused:
                await connection.drain()
        except BaseException:
            self._release()
            raise
        if type(got) is int:
            return PipeReply(self, got, size)
        self._release()
        if not got:
            return _EMPTY
        BYTES["out", "copy"] += len(got)
        return agent_pb2.ReadStreamResponse(data=got)

    async def read(self, size: int) -> bytes:
        """One read of up to ``size`` bytes, as bytes; b"" is EOF."""
        size = max(0, min(size, MAX_READ))
        async with self._lock:  # concurrent readers of one stream take turns
            try:
                got = await self._ready(size)
                return os.read(self.fd, size) if type(got) is int else got
            finally:
                if self._closing.done():
                    self._close_fd()

    async def _ready(self, size: int) -> int | bytes:
        """With the stream held: the count of bytes ready (> 0), or data read in a race, or b"" at EOF."""
        while True:
            if self.eof or self._closing.done() or size == 0:
                return b""
            ready = fionread(self.fd)
            if ready > 0:
                return ready
            # Nothing buffered: the writers are gone (EOF), or nothing was written yet.
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                data = None
            except OSError as exc:
                if exc.errno == errno.EIO and self.pty:
                    data = b""  # the slave side is closed: that is the pty's EOF
                else:
                    raise
            if data is not None:
                if not data:
                    self.eof = True
                return data
            if self._exited.done():
                # The process is gone: whatever it wrote is in the pipe already, but a
                # child it left behind may still write; give it the drain window.
                if not await self._wait(EXIT_DRAIN):
                    self.eof = True
                    return b""
            else:
                await self._wait(None, also=self._exited)

    def _release(self) -> None:
        self._lock.release()
        if self._closing.done() and not self._lock.locked():
            self._close_fd()

    def _spliced(self, exc: BaseException | None) -> None:
        self._release()

    async def _wait(self, timeout: float | None, also: asyncio.Future | None = None) -> bool:
        """Wait for output (True), or timeout / exit / close (False)."""
        ready = asyncio.ensure_future(_wait_fd(self.fd, False))
        waits = [ready, self._closing] + ([also] if also is not None else [])
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
        return ready.done() and not ready.cancelled()

    def close(self) -> None:
        """Close now, or as soon as an in-flight read returns (it returns EOF)."""
        if not self._closing.done():
            self._closing.set_result(None)
        if not self._lock.locked():
            self._close_fd()

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class InputStream:
    """stdin (a pipe) or the pty master."""

    def __init__(self, fd: int, *, pty: bool = False, owns_fd: bool = True) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.pty = pty
        self.closed = False
        self._owns_fd = owns_fd
        self._fd_closed = False
        self._lock = asyncio.Lock()
        self._closing = asyncio.get_running_loop().create_future()

    async def write(self, data: bytes) -> int:
        if self.closed:
            raise BrokenPipeError(errno.EPIPE, "stdin is closed")
        view = memoryview(data)
        async with self._lock:  # writes are whole and in order
            try:
                while view:
                    if self.closed:
                        raise BrokenPipeError(errno.EPIPE, "stdin was closed during the write")
                    try:
                        n = os.write(self.fd, view)
                        BYTES["in", "copy"] += n
                    except BlockingIOError:
                        ready = asyncio.ensure_future(_wait_fd(self.fd, True))
                        try:
                            await asyncio.wait([ready, self._closing], return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if not ready.done():
                                ready.cancel()
                                with contextlib.suppress(asyncio.CancelledError):
                                    await ready
                        continue
                    view = view[n:]
            finally:
                if self.closed:
                    self._close_fd()
        return len(data)

    def close(self) -> None:
        """Close stdin.  A pty master also carries the output, so for a terminal the
        process gets an end-of-file character instead of a hang-up."""
        if self.closed:
            return
        self.closed = True
        self._closing.set_result(None)
        if self.pty:
            with contextlib.suppress(OSError):
                eof = termios.tcgetattr(self.fd)[6][termios.VEOF]
                os.write(self.fd, eof if isinstance(eof, bytes) else bytes([eof]))
        if not self._lock.locked():
            self._close_fd()

    def _close_fd(self) -> None:
        if self._owns_fd and not self._fd_closed:
            self._fd_closed = True
            os.close(self.fd)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
