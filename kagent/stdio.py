"""Serving a process's stdio to the host, in the supervisor's event loop.

The parent ends of the pipes (or the pty master) arrive from the worker with
SCM_RIGHTS; ReadStdout/ReadStderr/WriteStdin work on them directly.

Read semantics follow upstream: one read of up to ``len`` bytes; empty data
means EOF — every writer closed, or the process exited and nothing more came
within the drain window (a daemonised grandchild may hold the pipe open
forever).  Nothing is buffered here: a host that does not read leaves the
bytes in the pipe, so a flooding container blocks on its own writes and the
agent's memory stays flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios

EXIT_DRAIN = 0.5  # seconds a read waits for more output after the process exited
MAX_READ = 4 << 20  # a ttRPC reply cannot carry more


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

    async def read(self, size: int) -> bytes:
        """One read of up to ``size`` bytes; b"" is EOF."""
        size = max(0, min(size, MAX_READ))
        async with self._lock:  # concurrent readers of one stream take turns
            try:
                return await self._read(size)
            finally:
                if self._closing.done():
                    self._close_fd()

    async def _read(self, size: int) -> bytes:
        while True:
            if self.eof or self._closing.done() or size == 0:
                return b""
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
