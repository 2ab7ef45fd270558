"""Byte-stream transports for ttRPC: listen and dial by Address.

Sockets (unix, abstract unix, vsock) go through the loop's stream servers.
A virtio-serial port is a character device that is one long-lived stream:
it is wrapped in a duplex transport made of the loop's pipe transports.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Callable

from kagent.ttrpc.addresses import Address, resolve_serial

ProtocolFactory = Callable[[], asyncio.Protocol]


def _bind_unix(addr: Address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if not addr.abstract:
            _remove_stale_socket(addr.path)
            os.makedirs(os.path.dirname(addr.path) or "/", exist_ok=True)
        sock.bind(addr.path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a dead agent; refuse one that someone serves."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listening: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is serving {path}")


def _bind_vsock(addr: Address) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((addr.cid, addr.port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen(addr: Address, factory: ProtocolFactory) -> asyncio.AbstractServer:
    """Start accepting connections on a socket address."""
    loop = asyncio.get_running_loop()
    if addr.scheme == "unix":
        sock = _bind_unix(addr)
        return await loop.create_unix_server(factory, sock=sock)
    if addr.scheme == "vsock":
        sock = _bind_vsock(addr)
        return await loop.create_server(factory, sock=sock)
    raise ValueError(f"cannot listen on {addr}: use unix://, vsock:// or serial://")


async def _hvsock_handshake(sock: socket.socket, port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"CONNECT {port}\n".encode())
    line = b""
    async with asyncio.timeout(timeout):
        while not line.endswith(b"\n"):
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: nothing past the line is ours
            if not chunk:
                raise ConnectionError(f"hybrid vsock: connection closed before OK (got {line!r})")
            line += chunk
            if len(line) > 512:
                break
    if not line.startswith(b"OK"):
        raise ConnectionError(f"hybrid vsock: CONNECT {port} refused: {line.strip()!r}")


async def dial(addr: Address, factory: ProtocolFactory, *, handshake_timeout: float = 10.0):
    """Connect; returns (transport, protocol)."""
    loop = asyncio.get_running_loop()
    if addr.scheme == "unix":
        if not addr.abstract:
            return await loop.create_unix_connection(factory, addr.path)
        # uvloop refuses abstract names as paths: connect the socket ourselves.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr.path)
        except BaseException:
            sock.close()
            raise
        return await loop.create_unix_connection(factory, sock=sock)
    if addr.scheme == "hvsock":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr.path)
            await _hvsock_handshake(sock, addr.port, handshake_timeout)
        except BaseException:
            sock.close()
            raise
        return await loop.create_unix_connection(factory, sock=sock)
    if addr.scheme == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (addr.cid, addr.port))
        except BaseException:
            sock.close()
            raise
        return await loop.create_connection(factory, sock=sock)
    if addr.scheme == "serial":
        return await open_serial(resolve_serial(addr.path), factory)
    raise ValueError(f"cannot dial {addr}")


class CharDeviceTransport(asyncio.Transport):
    """A character device (virtio-serial port, tty) as one duplex stream.

    The loop's pipe transports do not fit: a write pipe transport reads its fd
    to notice a closed peer, which on a duplex device would eat the input.
    So this reads and writes the one non-blocking fd itself.
    """

    HIGH_WATER = 1 << 20
    LOW_WATER = 256 << 10

    def __init__(self, fd: int, path: str, protocol: asyncio.Protocol, *, owns_fd: bool = True) -> None:
        super().__init__({"peername": path, "sockname": path})
        self._fd = fd
        self._owns_fd = owns_fd  # False: the fd outlives this connection (SerialPort)
        self._protocol = protocol
        self.error: OSError | None = None  # why the device failed (EIO: a tty hung up), if it did
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._closing = False
        self._paused = False
        self._writer_armed = False

    def start(self, first: bytes = b"") -> None:
        """Begin; ``first``: input already read from the device, delivered before the rest."""
        self._protocol.connection_made(self)
        if first:
            self._protocol.data_received(first)
        if not self._closing:
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 256 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: the other side of a tty hung up
            self._finish(exc)
            return
        if not data:
            self._finish(None)  # EOF: nobody on the host side (yet)
            return
        self._protocol.data_received(data)

    def write(self, data) -> None:
        if self._closing or not data:
            return
        if not self._out:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._finish(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self._out += data
        if not self._writer_armed:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_armed = True
        if not self._paused and len(self._out) > self.HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def _on_writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
        if self._paused and len(self._out) <= self.LOW_WATER:
            self._paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._finish(None)

    def abort(self) -> None:
        self._finish(None)

    def _finish(self, exc: OSError | None) -> None:
        if self._closing:
            return
        self._closing = True
        self.error = exc
        self._loop.remove_reader(self._fd)
        if self._writer_armed:
            self._loop.remove_writer(self._fd)
        if self._owns_fd:
            os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, exc)


class SerialPort:
    """A virtio-serial port (or a tty) kept open for the agent's whole life, one host
    connection after another.

    Closing a virtio-serial port in the guest discards the input it holds, so a port
    closed at one host's EOF and opened again would lose what the next host sent in
    between (its first request).  Kept open, nothing is lost.  While no host is there a
    read returns EOF at once and poll() reports POLLHUP without end, so the port cannot
    wait in the event loop: ``wait_for_host`` tries a read every POLL_INTERVAL instead,
    until the read has data or would block (a host is connected).
    """

    POLL_INTERVAL = 0.02

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.isatty(self.fd):
                import termios
                import tty

                tty.setraw(self.fd)  # a tty must not echo or translate our bytes
                termios.tcflush(self.fd, termios.TCIOFLUSH)
        except BaseException:
            os.close(self.fd)
            raise

    async def wait_for_host(self) -> bytes:
        """Return once a host is connected, with what it has sent so far (maybe nothing).
        OSError (EIO: a tty's other side is gone for good) means: reopen the port."""
        while True:
            try:
                data = os.read(self.fd, 256 << 10)
            except (BlockingIOError, InterruptedError):
                return b""  # connected, nothing sent yet
            if data:
                return data
            await asyncio.sleep(self.POLL_INTERVAL)  # EOF: nobody on the host side

    def connect(self, protocol: asyncio.Protocol, first: bytes) -> CharDeviceTransport:
        """One host connection on the port; it ends at the host's EOF, the port stays open."""
        transport = CharDeviceTransport(self.fd, self.path, protocol, owns_fd=False)
        transport.start(first)
        return transport

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def open_serial(path: str, factory: ProtocolFactory) -> tuple[CharDeviceTransport, asyncio.Protocol]:
    """Open a character device as one connection (the client's side): EOF closes it."""
    port = SerialPort(path)
    try:
        proto = factory()
        transport = CharDeviceTransport(port.fd, path, proto)  # owns the fd from here
    except BaseException:
        port.close()
        raise
    transport.start()
    return transport, proto
