"""The real uevent listener on a real NETLINK_KOBJECT_UEVENT socket (root).

Every test works in a network namespace it creates (tests/devices/devices_netns.py):
net-device events are delivered only to the namespace that owns the device, so the
veth and lo events seen here are the test's own.  Untagged events of the rest of the
machine (someone's loop device, say) may arrive too; nothing here depends on their absence.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time

import pytest
from devices_netns import NetnsHolder, in_netns

from kagent.devices import listener as listener_mod
from kagent.devices.listener import UeventListener
from kagent.devices.registry import DeviceRegistry

pytestmark = pytest.mark.root

FAKE = b"add@/devices/virtual/net/fake0\0ACTION=add\0DEVPATH=/devices/virtual/net/fake0\0" \
       b"SUBSYSTEM=net\0INTERFACE=fake0\0SEQNUM=1\0"


@pytest.fixture
def netns():
    with NetnsHolder() as ns:
        yield ns


def start_listener(ns: NetnsHolder, rcvbuf: int = listener_mod.RCVBUF):
    reg = DeviceRegistry(hotplug_timeout=10)
    sock = in_netns(ns.pid, lambda: listener_mod.open_socket(rcvbuf))
    lst = UeventListener(reg, sock)
    lst.start()
    return reg, lst


def user_sender(ns: NetnsHolder) -> socket.socket:
    """A userspace socket in the namespace that multicasts on the kernel's uevent group."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, listener_mod.NETLINK_KOBJECT_UEVENT)
        s.bind((0, 0))
        return s
    return in_netns(ns.pid, make)


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_socket_options(netns) -> None:
    reg, lst = start_listener(netns)
    try:
        sock = socket.socket(fileno=lst.fileno)  # a second object on the same fd, to look
        try:
            assert sock.family == socket.AF_NETLINK and sock.proto == 15
            assert sock.type & socket.SOCK_DGRAM
            assert fcntl.fcntl(lst.fileno, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(lst.fileno, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert sock.getsockname()[1] == 1  # the kernel's group
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= listener_mod.RCVBUF
        finally:
            sock.detach()
    finally:
        lst.close()
    assert lst.fileno == -1


async def test_veth_add_lo_synthetic_and_remove(netns) -> None:
    reg, lst = start_listener(netns)
    try:
        await asyncio.to_thread(netns.run, "ip", "link", "add", "kagv0", "type", "veth",
                                "peer", "name", "kagv1")
        uev = await reg.wait_for(
            lambda u: u.subsystem == "net" and u.interface == "kagv0", 10, "veth kagv0")
        assert (uev.action, uev.devpath) == ("add", "/devices/virtual/net/kagv0")
        assert uev.get("IFINDEX").isdigit() and uev.seqnum is not None
        assert "/devices/virtual/net/kagv1" in reg.devices  # the peer came too

        await asyncio.to_thread(netns.run, "sh", "-c", "echo add > /sys/class/net/lo/uevent")
        lo = await reg.wait_for(lambda u: u.interface == "lo", 10, "synthetic add of lo")
        assert (lo.action, lo.devpath, lo.get("SYNTH_UUID")) == ("add", "/devices/virtual/net/lo", "0")

        await asyncio.to_thread(netns.run, "ip", "link", "del", "kagv0")
        await until(lambda: "/devices/virtual/net/kagv0" not in reg.devices
                    and "/devices/virtual/net/kagv1" not in reg.devices)
        assert lst.stats.handled >= 3
        assert lst.stats.not_kernel == lst.stats.malformed == lst.stats.enobufs == 0
    finally:
        lst.close()


async def test_messages_not_from_the_kernel_are_dropped(netns) -> None:
    reg, lst = start_listener(netns)
    sender = user_sender(netns)
    try:
        sender.sendto(FAKE, (0, 1))
        await until(lambda: lst.stats.not_kernel == 1)
        assert "/devices/virtual/net/fake0" not in reg.devices
        await asyncio.to_thread(netns.run, "sh", "-c", "echo add > /sys/class/net/lo/uevent")
        await reg.wait_for(lambda u: u.interface == "lo", 10, "lo after a dropped message")
    finally:
        sender.close()
        lst.close()


async def test_receive_buffer_overrun_is_counted_not_fatal(netns) -> None:
    # Under uvloop an overrun (EPOLLERR) closes the reader unless the listener re-arms it.
    reg, lst = start_listener(netns, rcvbuf=1)  # the kernel's minimum: a few datagrams
    sender = user_sender(netns)
    try:
        for round_ in (1, 2):
            for _ in range(200):  # no await: the listener cannot drain in between
                sender.sendto(FAKE, (0, 1))
            await until(lambda n=round_: lst.stats.enobufs >= n)
            reg.devices.clear()
            await asyncio.to_thread(netns.run, "sh", "-c", "echo add > /sys/class/net/lo/uevent")
            await reg.wait_for(lambda u: u.interface == "lo", 10, f"lo after overrun {round_}")
        assert lst.stats.enobufs == 2
        assert 0 < lst.stats.not_kernel < 400
        assert lst.stats.errors == 0
    finally:
        sender.close()
        lst.close()


async def test_close_stops_reading(netns) -> None:
    reg, lst = start_listener(netns)
    lst.close()
    lst.close()  # twice is fine
    await asyncio.to_thread(netns.run, "sh", "-c", "echo add > /sys/class/net/lo/uevent")
    await asyncio.sleep(0.2)
    assert reg.devices == {} and lst.stats.received == 0
