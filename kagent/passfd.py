"""Direct stdio streams ("passfd" I/O): one host stream per stdio, bytes moved with splice(2).

Upstream's agent (src/agent/src/passfd_io.rs) listens on ``agent.passfd_listener_port``
(vsock, 1027 by default in runtime-rs).  For each stdio of a process the host
connects one stream; the agent files it under the peer's port.  CreateContainer
and ExecProcess then name those ports (stdin_port, stdout_port, stderr_port;
0 = none) and the agent pumps: stdin stream → stdin pipe (or pty master),
stdout pipe (or pty) → stdout stream, stderr pipe → stderr stream.  Exit
statuses are published only once the output pumps have finished.

Here a pump is a splice(2) loop in the supervisor's event loop: pipe → socket
and socket → pipe move page references, never bytes through Python.  A pty
cannot be spliced, so a pty end is copied through one preallocated buffer.
``EAGAIN`` does not say which end is not ready; FIONREAD on the source does.

Streams are keyed by the peer's port: a vsock peer's port, or for a unix-socket
listener (tests, benchmarks) the number after the last "." of the name the
peer bound its socket to (``@host-stdout.1234`` is port 1234).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import termios
from collections.abc import Callable
from typing import Any

from kagent import log as klog
from kagent import stdio
from kagent.errors import NotFound
from kagent.ttrpc.addresses import Address, parse
from kagent.ttrpc.transports import _bind_unix, _bind_vsock

_log = klog.get_logger("passfd")

CHUNK = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
TAKE_ATTEMPTS, TAKE_INTERVAL = 3, 0.1  # upstream retries 3 times, 100 ms apart
MAX_UNCLAIMED = 256  # streams filed but not yet claimed; beyond it the oldest is closed
EXIT_DRAIN = 0.5  # after the process exited, output may still come this long (a lingering child)


def _pending(fd: int) -> int:
    """Bytes readable now from a pipe, pty or socket (FIONREAD / SIOCINQ: the same ioctl)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


def peer_port(peer: Any) -> int | None:
    """The port a stream is filed under: the vsock peer port, or the number ending a unix peer's name."""
    if isinstance(peer, tuple) and len(peer) == 2:  # AF_VSOCK (cid, port)
        return int(peer[1])
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    if isinstance(peer, str) and "." in peer:
        tail = peer.rsplit(".", 1)[1].rstrip("\0")
        if tail.isdigit():
            return int(tail)
    return None


class Listener:
    """Accepts the host's streams and files them by port until a process claims them."""

    def __init__(self, address: str | Address) -> None:
        self.address = parse(address) if isinstance(address, str) else address
        self._sock: socket.socket | None = None
        self._streams: dict[int, socket.socket] = {}
        self._arrived: asyncio.Event | None = None

    def start(self) -> None:
        if self.address.scheme == "unix":
            sock = _bind_unix(self.address)
        elif self.address.scheme == "vsock":
            sock = _bind_vsock(self.address)
        else:
            raise ValueError(f"passfd listens on vsock:// (or unix:// for tests), not {self.address}")
        sock.setblocking(False)
        self._sock = sock
        self._arrived = asyncio.Event()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        _log.info("passfd listener started", address=str(self.address))

    def _accept(self) -> None:
        assert self._sock is not None and self._arrived is not None
        while True:
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                _log.warning("passfd accept failed", error=str(exc))
                break
            port = peer_port(peer)
            if port is None:
                _log.warning("passfd stream from a peer without a port: closed", peer=str(peer))
                conn.close()
                continue
            old = self._streams.pop(port, None)
            if old is not None:  # the host reconnected from the same port: the newest one counts
                old.close()
            conn.setblocking(False)
            self._streams[port] = conn
            if len(self._streams) > MAX_UNCLAIMED:  # a peer that connects and never claims: bounded
                oldest = next(iter(self._streams))
                _log.warning("too many unclaimed passfd streams: the oldest closed", port=oldest)
                self._streams.pop(oldest).close()
            self._arrived.set()
        self._arrived = asyncio.Event() if self._arrived.is_set() else self._arrived

    async def take(self, port: int) -> socket.socket:
        """The stream filed under ``port``; it may still be on its way (waits ~0.3 s, as upstream)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAKE_ATTEMPTS * TAKE_INTERVAL
        while True:
            sock = self._streams.pop(port, None)
            if sock is not None:
                return sock
            left = deadline - loop.time()
            if left <= 0 or self._arrived is None:
                raise NotFound(f"no passfd stream from port {port} (is the host connected to "
                               f"{self.address}?)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self.address.scheme == "unix" and not self.address.abstract:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address.path)
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()


class Pump:
    """Moves bytes ``src`` → ``dst`` until end of input; owns both descriptors (closes them).

    A callback state machine on the event loop, not a task: it watches the end
    that is not ready (the source when empty, the destination when full; FIONREAD
    on the source tells which) and keeps that watch registered while it stays
    the same, so a long transfer costs one wake-up and one splice per socket
    buffer, and no future or epoll_ctl per wait.

    ``exited`` (output pumps): once the process is gone, a source that stays
    empty for EXIT_DRAIN seconds ends the pump even if a lingering child holds
    the pipe.  ``on_end`` runs when the pump ends, whatever the reason; ``done``
    is a future that gets the byte count then.
    """

    STEP_MOVES = 64  # moves per callback before letting the loop run other work

    def __init__(self, src: int, dst: int, *, name: str, splice: bool = True, src_is_pty: bool = False,
                 exited: asyncio.Future | None = None, on_end: Callable[[], None] | None = None,
                 direction: str = "out") -> None:
        self.src, self.dst, self.name = src, dst, name
        self.splice = splice and not src_is_pty
        self._counter = (direction, "splice" if self.splice else "copy")  # key of kagent.stdio.BYTES
        self.src_is_pty = src_is_pty
        self.exited = exited
        self.on_end = on_end
        self.moved = 0
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[int] = self._loop.create_future()
        self._buf = None if self.splice else memoryview(bytearray(CHUNK))
        self._left: memoryview | None = None  # copy path: bytes read but not yet written
        self._watch: tuple[int, bool] | None = None  # (fd, writable) registered with the loop
        self._drain_timer: asyncio.TimerHandle | None = None
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        if exited is not None:
            exited.add_done_callback(self._on_exit)
        self._loop.call_soon(self._step)

    def _step(self) -> None:
        if self.done.done():
            return
        try:
            for _ in range(self.STEP_MOVES):
                if self._move() == 0:
                    self._end()
                    return
                if self._drain_timer is not None:  # output came: the quiet period starts again
                    self._drain_timer.cancel()
                    self._drain_timer = None
            self._loop.call_soon(self._step)
        except BlockingIOError:
            self._wait_for_ready()
        except OSError as exc:
            if exc.errno == errno.EIO and self.src_is_pty:
                self._end()  # the pty's slave side closed: its end of output
            elif exc.errno in (errno.EPIPE, errno.ECONNRESET):
                _log.info("passfd stream closed by its reader", stream=self.name)
                self._end()
            else:
                _log.warning("passfd pump failed", stream=self.name, error=str(exc))
                self._end()

    def _move(self) -> int:
        """Move what is ready; 0 at end of input; BlockingIOError when an end is not ready."""
        if self._buf is None:
            n = os.splice(self.src, self.dst, CHUNK, flags=SPLICE_FLAGS)
            self.moved += n
            stdio.BYTES[self._counter] += n
            return n
        if not self._left:  # the copy path (a pty end): one chunk at a time, finished before the next
            n = os.readv(self.src, [self._buf])
            if n == 0:
                return 0
            self._left = self._buf[:n]
        while self._left:
            k = os.write(self.dst, self._left)
            self.moved += k
            stdio.BYTES[self._counter] += k
            self._left = self._left[k:]
        return 1

    def _wait_for_ready(self) -> None:
        """After EAGAIN: watch whichever end was not ready."""
        if self._left or _pending(self.src) > 0:
            self._set_watch(self.dst, True)
            return
        self._set_watch(self.src, False)
        if self.exited is not None and self.exited.done() and self._drain_timer is None:
            self._drain_timer = self._loop.call_later(EXIT_DRAIN, self._drained)

    def _on_exit(self, _: asyncio.Future) -> None:
        if self._watch == (self.src, False) and self._drain_timer is None and not self.done.done():
            self._drain_timer = self._loop.call_later(EXIT_DRAIN, self._drained)

    def _drained(self) -> None:
        self._drain_timer = None
        if not self.done.done() and _pending(self.src) == 0:
            self._end()  # the process is gone and nothing came for EXIT_DRAIN seconds

    def _set_watch(self, fd: int, writable: bool) -> None:
        if self._watch == (fd, writable):
            return
        self._clear_watch()
        (self._loop.add_writer if writable else self._loop.add_reader)(fd, self._step)
        self._watch = (fd, writable)

    def _clear_watch(self) -> None:
        if self._watch is not None:
            fd, writable = self._watch
            (self._loop.remove_writer if writable else self._loop.remove_reader)(fd)
            self._watch = None

    def _end(self) -> None:
        if self.done.done():
            return
        self._clear_watch()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        for fd in (self.src, self.dst):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.done.set_result(self.moved)
        if self.on_end is not None:
            self.on_end()

    def cancel(self) -> None:
        """Stop now (the process is being removed)."""
        self._end()


class Streams:
    """The pumps of one process; ``outputs_done`` is what exit publication waits for."""

    def __init__(self, pumps: list[Pump]) -> None:
        self.pumps = pumps

    async def outputs_done(self) -> None:
        outs = [p.done for p in self.pumps if p.exited is not None]
        if outs:
            await asyncio.gather(*outs, return_exceptions=True)

    def close(self) -> None:
        for p in self.pumps:
            p.cancel()


class Claimed:
    """The host's streams for one process, taken before the process exists.

    Taking them first means a missing stream fails ExecProcess/CreateContainer
    before anything runs; ``release`` gives them back (closes them) when the
    process could not be made.
    """

    def __init__(self, socks: dict[str, socket.socket]) -> None:
        self.socks = socks

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.socks)

    def release(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()


async def claim(listener: Listener, *, stdin_port: int = 0, stdout_port: int = 0,
                stderr_port: int = 0) -> Claimed:
    """Take the streams the host connected for a process (0 = that stdio has none)."""
    socks: dict[str, socket.socket] = {}
    try:
        for name, port in (("stdin", stdin_port), ("stdout", stdout_port), ("stderr", stderr_port)):
            if port:
                socks[name] = await listener.take(port)
    except BaseException:
        Claimed(socks).release()
        raise
    return Claimed(socks)


def attach(claimed: Claimed, proc: Any) -> Streams:
    """Start pumping between ``claimed``'s streams and ``proc``'s stdio (a kagent.container.Process).

    The pumps work on duplicates of the process's stdio descriptors.  When the
    stdin stream ends, the process's stdin is closed (for a terminal: an EOF
    character).  ReadStdout/WriteStdin must not be used on a stream pumped here.
    """
    socks, claimed.socks = claimed.socks, {}
    pumps: list[Pump] = []
    label = f"{getattr(proc, 'exec_id', '?')}"
    pty = bool(getattr(proc, "terminal", False))
    if "stdin" in socks and proc.stdin is not None:
        sock = socks.pop("stdin")
        pumps.append(Pump(_own(sock), os.dup(proc.stdin.fd), name=f"{label} stdin", splice=not pty,
                          on_end=proc.stdin.close, direction="in"))
    for name in ("stdout", "stderr"):
        stream = getattr(proc, name)
        if name in socks and stream is not None:
            sock = socks.pop(name)
            pumps.append(Pump(os.dup(stream.fd), _own(sock), name=f"{label} {name}", src_is_pty=pty,
                              exited=proc.exited))
    for s in socks.values():  # a port for a stream the process does not have (stderr of a tty)
        s.close()
    return Streams(pumps)


def _own(sock: socket.socket) -> int:
    """The socket's descriptor, now owned by the caller (the socket object lets go of it)."""
    return sock.detach()
