"""The kernel uevent listener: a NETLINK_KOBJECT_UEVENT socket read in the event loop.

The socket is non-blocking and watched with ``loop.add_reader``; each readable callback
drains up to a batch of datagrams with recvmsg_into (one preallocated buffer), drops
those not sent by the kernel (sender port ≠ 0: another process multicasting on the
family), parses the rest and feeds them to the DeviceRegistry.  Nothing received can
stop it: a malformed message is counted and logged, ENOBUFS (the receive buffer
overflowed during a storm, so events were lost) is counted and logged, and any other
receive error is logged.

A netlink socket sees the events of the network namespace it was created in, so the
listener must be started from the agent's own namespace (the guest's, in a VM).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass

from kagent.devices import uevent
from kagent.devices.registry import DeviceRegistry
from kagent.log import get_logger

log = get_logger("uevent")

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's multicast group; udevd re-broadcasts on group 2
#: the socket receive buffer: a hot-plug storm (hundreds of memory blocks, queues of many
#: NICs) must not overflow it while the loop is busy
RCVBUF = 16 * 1024 * 1024
#: datagrams read per readable callback before yielding to the loop
BATCH = 256

# SO_RCVBUFFORCE (Linux): as SO_RCVBUF but may exceed net.core.rmem_max (CAP_NET_ADMIN).
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@dataclass
class ListenerStats:
    received: int = 0  # datagrams read
    handled: int = 0  # parsed and given to the registry
    not_kernel: int = 0  # dropped: sender port ≠ 0
    malformed: int = 0  # dropped: the parser said no (or the datagram was truncated)
    enobufs: int = 0  # receive-buffer overruns: events were lost
    errors: int = 0  # other receive errors


def open_socket(rcvbuf: int = RCVBUF) -> socket.socket:
    """A bound, non-blocking uevent socket in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK,
                         socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                         NETLINK_KOBJECT_UEVENT)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # no CAP_NET_ADMIN: as much as rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, KERNEL_GROUP))  # port 0: the kernel picks a unique one
    except BaseException:
        sock.close()
        raise
    return sock


class UeventListener:
    """Reads kernel uevents in the running loop and hands them to ``registry``."""

    def __init__(self, registry: DeviceRegistry, sock: socket.socket | None = None,
                 rcvbuf: int = RCVBUF) -> None:
        self.registry = registry
        self.stats = ListenerStats()
        self._rcvbuf = rcvbuf
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rearm_pending = False
        # One datagram at most: a longer one comes back with MSG_TRUNC and is dropped.
        self._buf = bytearray(uevent.MAX_MESSAGE_SIZE)
        self._view = memoryview(self._buf)

    @property
    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the socket (unless one was given) and start reading in ``loop``."""
        if self._loop is not None:
            return
        if self._sock is None:
            self._sock = open_socket(self._rcvbuf)
        else:
            self._sock.setblocking(False)
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        log.info("uevent listener started", parser=uevent.IMPLEMENTATION,
                 rcvbuf=self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        self._sock.close()
        self._sock = None

    def _rearm_soon(self) -> None:
        # An overrun sets the socket's error, so epoll reports EPOLLERR; libuv then stops the
        # poll handle and uvloop, after running this callback once more, closes it: the reader
        # would be gone without a word.  Registering again after this callback returns (and
        # after uvloop's close) keeps the listener alive; under plain asyncio it is harmless.
        if not self._rearm_pending and self._loop is not None:
            self._rearm_pending = True
            self._loop.call_soon(self._rearm)

    def _rearm(self) -> None:
        self._rearm_pending = False
        if self._sock is None or self._loop is None:
            return
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self._on_readable)
        self._on_readable()  # what arrived in between (level-triggered polls would say so too)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        stats = self.stats
        view = self._view
        parse = uevent.parse
        handle = self.registry.handle
        for _ in range(BATCH):
            try:
                nbytes, _anc, flags, addr = sock.recvmsg_into([view])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    stats.enobufs += 1
                    log.warning("uevent receive buffer overrun: events were lost",
                                overruns=stats.enobufs)
                    self._rearm_soon()
                    continue
                stats.errors += 1
                log.error("failed to receive uevent", error=str(exc))
                if exc.errno not in (errno.EBADF, errno.ENOTSOCK):
                    self._rearm_soon()  # any socket error shows as EPOLLERR, as above
                return
            stats.received += 1
            if addr[0] != 0:
                stats.not_kernel += 1
                log.warning("dropped uevent not sent by the kernel", sender_port=addr[0],
                            error="EBADMSG")
                continue
            uev = parse(view[:nbytes]) if not flags & socket.MSG_TRUNC else None
            if uev is None:
                stats.malformed += 1
                log.warning("dropped malformed uevent", size=nbytes,
                            head=bytes(view[:min(nbytes, 64)]).decode("ascii", "replace"))
                continue
            stats.handled += 1
            log.debug("got uevent", action=uev.action, devpath=uev.devpath,
                      subsystem=uev.subsystem, devname=uev.devname, seqnum=uev.seqnum)
            try:
                handle(uev)
            except Exception:  # handle() is built not to raise; belt and braces
                log.exception("uevent handling failed", devpath=uev.devpath)
        # A full batch: more may be queued; the reader fires again on the next loop turn.
