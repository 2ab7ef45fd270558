"""The device registry: events seen before and after a wait starts, timeouts, removal,
memory-block onlining (fake sysfs) and CPU records."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_sysfs import FakeSysfs
from uevent_vectors import make_uevent as ev

from kagent.devices.registry import DeviceRegistry, format_timeout
from kagent.errors import DeadlineExceeded

VDA = "/devices/pci0000:00/0000:00:02.0/0000:01:01.0/virtio4/block/vda"


def is_vda(u) -> bool:
    return u.subsystem == "block" and u.devname == "vda"


@pytest.fixture
def fake(tmp_path) -> FakeSysfs:
    return FakeSysfs(str(tmp_path))


async def test_event_before_the_wait_is_found() -> None:
    reg = DeviceRegistry(hotplug_timeout=0.05)
    uev = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda")
    reg.handle(uev)
    assert await reg.wait_for(is_vda, what="vda") is uev
    assert reg.waiting == []


async def test_event_after_the_wait_starts_wakes_the_waiter() -> None:
    reg = DeviceRegistry(hotplug_timeout=5)
    task = asyncio.create_task(reg.wait_for(is_vda, None, "block device vda"))
    await asyncio.sleep(0)
    assert reg.waiting == ["block device vda"]
    reg.handle(ev("add", "/devices/virtual/net/lo", SUBSYSTEM="net", INTERFACE="lo"))
    await asyncio.sleep(0)
    assert not task.done()
    uev = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda")
    reg.handle(uev)
    assert await task is uev
    assert reg.waiting == []


async def test_event_in_the_same_loop_turn_as_the_wait_is_not_missed() -> None:
    # The listener's callback and the handler interleave only at awaits: an event handled
    # just after wait_for() was called (before it first yields) must still be seen.
    reg = DeviceRegistry(hotplug_timeout=5)
    uev = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda")
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(reg.wait_for(is_vda, None, "vda"))
    loop.call_soon(reg.handle, uev)
    assert await task is uev


async def test_several_waiters_one_event() -> None:
    reg = DeviceRegistry(hotplug_timeout=5)
    a = asyncio.create_task(reg.wait_for(is_vda, None, "a"))
    b = asyncio.create_task(reg.wait_for(lambda u: u.devpath.endswith("/vda"), None, "b"))
    c = asyncio.create_task(reg.wait_for(lambda u: u.devname == "vdb", None, "c"))
    await asyncio.sleep(0)
    uev = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda")
    reg.handle(uev)
    assert await a is uev and await b is uev
    assert reg.waiting == ["c"]
    c.cancel()
    with pytest.raises(asyncio.CancelledError):
        await c
    assert reg.waiting == [] and reg._waiters == []


async def test_timeout_names_the_device_and_the_timeout() -> None:
    reg = DeviceRegistry(hotplug_timeout=0.2)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await reg.wait_for(is_vda, None, "block device at PCI path 02/01")
    took = time.monotonic() - start
    assert str(info.value) == "timeout after 200ms waiting for block device at PCI path 02/01"
    assert 0.15 <= took < 2
    assert reg._waiters == []
    with pytest.raises(DeadlineExceeded, match="timeout after 50ms waiting for x"):
        await reg.wait_for(is_vda, 0.05, "x")  # an explicit timeout wins


@pytest.mark.parametrize("seconds, text", [
    (3, "3s"), (3.0, "3s"), (0.5, "500ms"), (1.5, "1.5s"), (60, "1m"), (90, "1m30s"), (0.001, "1ms"),
])
def test_format_timeout(seconds, text) -> None:
    assert format_timeout(seconds) == text


async def test_remove_forgets_the_device() -> None:
    reg = DeviceRegistry(hotplug_timeout=0.05)
    reg.handle(ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda"))
    assert VDA in reg.devices
    reg.handle(ev("remove", VDA, SUBSYSTEM="block", DEVNAME="vda"))
    assert VDA not in reg.devices
    with pytest.raises(DeadlineExceeded):
        await reg.wait_for(is_vda, None, "vda")


def test_only_add_is_recorded() -> None:
    reg = DeviceRegistry()
    for action in ("change", "bind", "move", "online"):
        reg.handle(ev(action, VDA, SUBSYSTEM="block", DEVNAME="vda"))
    assert reg.devices == {}


def test_readd_replaces_and_the_newest_is_found() -> None:
    reg = DeviceRegistry()
    first = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda", SEQNUM="1")
    second = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda", SEQNUM="2")
    reg.handle(first)
    reg.handle(ev("add", "/devices/virtual/block/vdb", SUBSYSTEM="block", DEVNAME="vda"))
    reg.handle(second)
    assert reg.devices[VDA] is second
    assert reg.find(lambda u: u.devname == "vda") is second


def test_bounded_memory() -> None:
    reg = DeviceRegistry(max_devices=3)
    for i in range(5):
        reg.handle(ev("add", f"/devices/virtual/net/eth{i}", SUBSYSTEM="net"))
    assert list(reg.devices) == [f"/devices/virtual/net/eth{i}" for i in (2, 3, 4)]


async def test_a_broken_matcher_does_not_stop_the_others() -> None:
    reg = DeviceRegistry(hotplug_timeout=5)

    def broken(u):
        raise RuntimeError("bug in a matcher")

    bad = asyncio.create_task(reg.wait_for(broken, 0.1, "broken"))
    good = asyncio.create_task(reg.wait_for(is_vda, None, "good"))
    await asyncio.sleep(0)
    uev = ev("add", VDA, SUBSYSTEM="block", DEVNAME="vda")
    reg.handle(uev)  # must not raise
    assert await good is uev
    with pytest.raises(DeadlineExceeded):
        await bad


def test_memory_block_is_onlined(fake) -> None:
    online = fake.memory_block(32)
    reg = DeviceRegistry(sysfs_root=fake.sys)
    reg.handle(ev("add", "/devices/system/memory/memory32", SUBSYSTEM="memory"))
    with open(online) as f:
        assert f.read() == "1"
    assert reg.onlined_memory == 1 and reg.devices == {}


def test_memory_block_online_failure_is_logged_not_raised(fake) -> None:
    reg = DeviceRegistry(sysfs_root=fake.sys)
    reg.handle(ev("add", "/devices/system/memory/memory7", SUBSYSTEM="memory"))  # no such block
    assert reg.online_failures == 1 and reg.onlined_memory == 0


@pytest.mark.parametrize("devpath", [
    "/devices/system/memory/memory32/../../../../etc",  # never a path outside the block
    "/devices/system/memory/memory",
    "/devices/system/memory/block_size_bytes",
])
def test_only_memory_blocks_are_onlined(fake, devpath) -> None:
    fake.memory_block(32)
    reg = DeviceRegistry(sysfs_root=fake.sys)
    reg.handle(ev("add", devpath, SUBSYSTEM="memory"))
    assert reg.onlined_memory == 0 and reg.online_failures == 0
    assert fake.read("/devices/system/memory/memory32/online") == "0\n"


def test_cpu_add_is_recorded() -> None:
    reg = DeviceRegistry()
    reg.handle(ev("add", "/devices/system/cpu/cpu2", SUBSYSTEM="cpu"))
    reg.handle(ev("add", "/devices/system/cpu/cpu3", SUBSYSTEM="cpu"))
    reg.handle(ev("add", "/devices/system/cpu/cpufreq", SUBSYSTEM="cpu"))  # not a CPU
    reg.handle(ev("remove", "/devices/system/cpu/cpu3", SUBSYSTEM="cpu"))
    assert reg.added_cpus == [2, 3]
    assert "/devices/system/cpu/cpu2" in reg.devices
    assert reg.take_added_cpus() == [2, 3]
    assert reg.take_added_cpus() == []
