"""Log forwarding (agent.log_vport): the JSON log lines, streamed to one reader on the host.

    fwd = LogForwarder(max_bytes=1 << 20)
    fwd.install()                          # a handler on the "kagent" logger tree
    await fwd.start("vsock://-1:1025")     # or unix:///path (tests)
    ...
    await fwd.close()

Upstream copies its log pipe to the one connection it accepts on the port.  Here:

- records are formatted as the stderr lines are (kagent.log.JsonFormatter) and queued in a
  bounded buffer (bytes, newest kept): while nobody is connected, or while the reader is slow,
  the oldest lines are dropped and counted;
- when a reader connects, the count of dropped lines is reported first, as a JSON line of its
  own (``"msg": "log lines dropped"``), then the buffered lines follow;
- one reader at a time: a new connection replaces the old one (a host-side reader that
  reconnects after a restart is not locked out by its own dead connection);
- nothing ever blocks the agent: a log call appends to the buffer (from any thread); the
  socket is written on the event loop, only as fast as the reader reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time

from kagent import log as klog

DEFAULT_MAX_BYTES = 1 << 20
_WRITE_HIGH_WATER = 64 << 10  # bytes handed to the transport before we wait for it to drain


def address_for(vport: int) -> str:
    """The listen address for ``agent.log_vport`` (tests pass a unix:///path to start())."""
    return f"vsock://-1:{vport}"


class _Reader(asyncio.Protocol):
    def __init__(self, forwarder: LogForwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.forwarder._attach(self)

    def data_received(self, data: bytes) -> None:
        pass  # the host does not talk on this port

    def eof_received(self) -> bool:
        # EOF: the reader is gone (a half-close cannot be told apart from a closed reader
        # until a write fails, and the line that write carried would be lost).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.forwarder._detach(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.forwarder._schedule()


class LogForwarder(logging.Handler):
    """A logging handler that streams JSON lines to the connected host reader."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        self.setFormatter(klog.JsonFormatter())
        self.max_bytes = max(1024, max_bytes)
        self._lines: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.dropped = 0  # since the last report to a reader
        self.dropped_total = 0
        self._reader: _Reader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._scheduled = False
        self._server: asyncio.AbstractServer | None = None
        self._socket_file: str | None = None

    # -- the logging side (any thread) --------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            return
        self._queue(line)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass  # never raise, never print: a log call must not fail

    def _queue(self, line: bytes) -> None:
        # Handler.handle holds self.lock around emit; _pump takes it too.
        lines = self._lines
        lines.append(line)
        self._size += len(line)
        while self._size > self.max_bytes and len(lines) > 1:
            self._size -= len(lines.popleft())
            self.dropped += 1
            self.dropped_total += 1
        if self._reader is not None and not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None or self._scheduled:
            return
        self._scheduled = True
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._pump)
            else:
                loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # the loop is closed
            self._scheduled = False

    # -- the loop side -------------------------------------------------------

    def _pump(self) -> None:
        """Move lines into the reader's transport, while it keeps up."""
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            self._scheduled = False
            reader = self._reader
            if reader is None or reader.transport is None or reader.paused:
                return
            transport = reader.transport
            batch: list[bytes] = []
            room = _WRITE_HIGH_WATER - transport.get_write_buffer_size()
            if self.dropped:
                batch.append(self._dropped_line(self.dropped))
                self.dropped = 0
            while self._lines and room > 0:
                line = self._lines.popleft()
                self._size -= len(line)
                room -= len(line)
                batch.append(line)
            more = bool(self._lines)
        if batch:
            transport.write(b"".join(batch))
        if more and not reader.paused:
            # The transport took what fits; go on when it has drained (resume_writing) or
            # on the next loop turn if it never paused.
            if transport.get_write_buffer_size() < _WRITE_HIGH_WATER:
                self._schedule()

    def _dropped_line(self, count: int) -> bytes:
        record = logging.LogRecord("kagent.logforward", logging.WARNING, "(unknown file)", 0,
                                   "log lines dropped", None, None)
        record.kagent_subsystem = "logforward"
        record.kagent_fields = {"dropped": count, "reason": "no reader connected, or a slow one"}
        record.kagent_time_ns = time.time_ns()
        return (self.format(record) + "\n").encode()

    def _attach(self, reader: _Reader) -> None:
        with self.lock:  # type: ignore[union-attr]
            old, self._reader = self._reader, reader
        if old is not None and old.transport is not None:
            old.transport.close()  # one reader: the newest wins
        self._schedule()

    def _detach(self, reader: _Reader) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._reader is reader:
                self._reader = None

    # -- life cycle -----------------------------------------------------------

    def install(self, logger: logging.Logger | None = None) -> None:
        """Attach to the agent's logger tree (after kagent.log.setup(), which keeps only its own)."""
        (logger or logging.getLogger(klog.ROOT)).addHandler(self)

    def uninstall(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger(klog.ROOT)).removeHandler(self)

    async def start(self, address: str) -> None:
        """Listen on ``address`` (vsock://-1:N, unix:///path). OSError/ValueError if it cannot."""
        from kagent.ttrpc.addresses import parse
        from kagent.ttrpc.transports import listen

        addr = parse(address)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._server = await listen(addr, lambda: _Reader(self))
        if addr.scheme == "unix" and not addr.abstract:
            self._socket_file = addr.path

    @property
    def connected(self) -> bool:
        return self._reader is not None

    @property
    def buffered_bytes(self) -> int:
        return self._size

    async def close(self) -> None:
        """Stop listening; give the reader what is buffered (briefly), then close it."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._socket_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_file)
            self._socket_file = None
        reader = self._reader
        if reader is not None and reader.transport is not None:
            self._pump()
            deadline = asyncio.get_running_loop().time() + 1.0
            while (reader.transport is not None and (self._lines or reader.transport.get_write_buffer_size())
                   and asyncio.get_running_loop().time() < deadline):
                await asyncio.sleep(0.01)
                self._pump()
            if reader.transport is not None:
                reader.transport.close()
        self._loop = None
