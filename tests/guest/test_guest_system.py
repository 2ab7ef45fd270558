"""kagent.guest, the system side: guest details, clock, entropy, memory probe, swap.

What must never touch the host is tested on files and FIFOs the tests create, in a
child without the capability, or against a fake libc call (said at each test):
the host's clock, entropy pool and swap stay as they are.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time

import pytest
from guest_harness import run_in_child

import kagent
from kagent import guest
from kagent.errors import AgentError, InvalidArgument, NotFound, PermissionDenied
from kagent.ttrpc.codes import Code

# --- GetGuestDetails ---------------------------------------------------------------------------


def test_details_from_a_fake_sysfs(fake_root):
    d = guest.guest_details(True, True, storage_handlers=["virtio-fs", "ephemeral"], root=str(fake_root))
    assert d.mem_block_size_bytes == 0x8000000
    assert d.support_mem_hotplug_probe is True
    assert d.version == kagent.__version__
    assert d.init_daemon is False  # the test runner is not PID 1
    assert d.storage_handlers == ["virtio-fs", "ephemeral"]
    assert d.supports_seccomp is True and d.extra_features == ["agent-policy", "seccomp"]


def test_details_not_asked_are_zero(fake_root):
    d = guest.guest_details(False, False, root=str(fake_root))
    assert (d.mem_block_size_bytes, d.support_mem_hotplug_probe) == (0, False)


def test_details_without_memory_hotplug_or_seccomp(tmp_path):
    d = guest.guest_details(True, True, root=str(tmp_path))
    assert (d.mem_block_size_bytes, d.support_mem_hotplug_probe) == (0, False)
    assert d.supports_seccomp is False and d.extra_features == ["agent-policy"]


def test_seccomp_seen_through_actions_avail(tmp_path):
    path = tmp_path / "proc/sys/kernel/seccomp"
    path.mkdir(parents=True)
    (path / "actions_avail").write_text("kill_process allow\n")
    assert guest.kernel_has_seccomp(str(tmp_path)) is True


def test_this_kernel_has_seccomp():
    # machine-facts §10: SECCOMP_FILTER is built in here
    assert guest.kernel_has_seccomp("/") is True


def test_invalid_block_size_is_an_internal_error(fake_root):
    (fake_root / "sys/devices/system/memory/block_size_bytes").write_text("zz\n")
    with pytest.raises(AgentError, match="invalid memory block size") as exc:
        guest.memory_block_size(str(fake_root))
    assert exc.value.code == Code.INTERNAL


def test_this_machine_block_size_parses():
    size = guest.memory_block_size("/")
    assert size == 0 or size & (size - 1) == 0  # sysfs gives a power of two


# --- SetGuestDateTime --------------------------------------------------------------------------


class FakeClockLibc:
    """Stands in for libc's clock_settime: CLOCK_REALTIME is not namespaced, so the
    real call would move the host's clock."""

    def __init__(self, fail_errno: int = 0):
        self.calls: list[tuple[int, int, int]] = []
        self.fail_errno = fail_errno

    def clock_settime(self, clock, ts_ref):
        ts = ts_ref._obj
        self.calls.append((clock, ts.tv_sec, ts.tv_nsec))
        if self.fail_errno:
            ctypes.set_errno(self.fail_errno)
            return -1
        return 0


@pytest.mark.parametrize("sec,usec", [(0, 0), (-5, 0), (1_700_000_000, -1), (1_700_000_000, 1_000_000)])
def test_set_time_validation(monkeypatch, sec, usec):
    fake = FakeClockLibc()
    monkeypatch.setattr(guest, "_libc", fake)
    with pytest.raises(InvalidArgument):
        guest.set_guest_datetime(sec, usec)
    assert fake.calls == []


def test_set_time_passes_seconds_and_nanoseconds(monkeypatch):
    fake = FakeClockLibc()
    monkeypatch.setattr(guest, "_libc", fake)
    guest.set_guest_datetime(1_700_000_123, 456_789)
    assert fake.calls == [(guest.CLOCK_REALTIME, 1_700_000_123, 456_789_000)]


def test_set_time_errno_becomes_a_domain_error(monkeypatch):
    monkeypatch.setattr(guest, "_libc", FakeClockLibc(errno.EPERM))
    with pytest.raises(PermissionDenied, match="clock_settime"):
        guest.set_guest_datetime(1_700_000_000, 0)
    monkeypatch.setattr(guest, "_libc", FakeClockLibc(errno.EINVAL))
    with pytest.raises(InvalidArgument):
        guest.set_guest_datetime(2**62, 0)


CAP_SYS_TIME = 25


@pytest.mark.root
def test_set_time_real_syscall_without_cap_sys_time():
    """The real clock_settime, in a child that has dropped CAP_SYS_TIME: the kernel answers
    EPERM and the clock cannot move.  The child checks the drop before calling."""
    from kagent.runtime import syscalls

    def child():
        eff, perm, inh = syscalls.capget()
        mask = ~(1 << CAP_SYS_TIME)
        syscalls.capset(eff & mask, perm & mask, inh & mask)
        if syscalls.capget()[0] & (1 << CAP_SYS_TIME):
            return "cap still held"  # never call the real thing then
        try:
            guest.set_guest_datetime(int(time.time()), 0)
        except PermissionDenied as exc:
            return "denied: " + exc.message
        return "clock set?!"

    assert run_in_child(child).startswith("denied: clock_settime")


# --- ReseedRandomDev ---------------------------------------------------------------------------


def test_reseed_constants_are_the_kernel_ioctls():
    ioc_write, int_size, rnd = 1, 4, ord("R")
    assert guest.RNDADDTOENTCNT == (ioc_write << 30) | (int_size << 16) | (rnd << 8) | 0x01
    assert guest.RNDRESEEDCRNG == (rnd << 8) | 0x07


def test_reseed_empty_data_is_invalid(tmp_path):
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    with pytest.raises(InvalidArgument):
        guest.reseed_random(b"", str(dev))
    assert dev.read_bytes() == b""


def test_reseed_missing_device(tmp_path):
    with pytest.raises(NotFound):
        guest.reseed_random(b"seed", str(tmp_path / "nope"))


def test_reseed_file_gets_the_data_then_real_ioctl_fails(tmp_path):
    """A regular file stands in for /dev/random: the write lands, and the real ioctl is
    refused by the kernel (ENOTTY) because a file is not the random device."""
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    with pytest.raises(AgentError, match="reseed") as exc:
        guest.reseed_random(b"\x01\x02" * 100, str(dev))
    assert exc.value.code == Code.INTERNAL
    assert dev.read_bytes() == b"\x01\x02" * 100


def test_reseed_through_a_pipe(tmp_path):
    fifo = tmp_path / "random"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(AgentError):  # ENOTTY: a pipe is not the random device
            guest.reseed_random(b"entropy!", str(fifo))
        assert os.read(reader, 100) == b"entropy!"
    finally:
        os.close(reader)


def test_reseed_ioctls_in_order(tmp_path, monkeypatch):
    """The ioctls against a fake (the real ones would credit the host's entropy pool)."""
    calls = []
    monkeypatch.setattr(guest, "_ioctl", lambda fd, req, arg: calls.append((req, arg)))
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    guest.reseed_random(b"x" * 32, str(dev))
    assert calls == [(guest.RNDADDTOENTCNT, struct.pack("i", 32)), (guest.RNDRESEEDCRNG, 0)]
    assert dev.read_bytes() == b"x" * 32


# --- MemHotplugByProbe -------------------------------------------------------------------------


def test_probe_writes_each_address_in_upper_hex(fake_root):
    """The probe file is a FIFO here, so each write can be seen on its own."""
    probe = fake_root / "sys/devices/system/memory/probe"
    probe.unlink()
    os.mkfifo(probe)
    reader = os.open(probe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        guest.mem_hotplug_by_probe([0x100000000, 0xABC000], root=str(fake_root))
        assert os.read(reader, 100) == b"0x1000000000xABC000"
    finally:
        os.close(reader)


def test_probe_single_address_in_a_file(fake_root):
    guest.mem_hotplug_by_probe([0x8000000], root=str(fake_root))
    assert (fake_root / "sys/devices/system/memory/probe").read_text() == "0x8000000"


def test_probe_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="probe"):
        guest.mem_hotplug_by_probe([0x1000], root=str(tmp_path))
    guest.mem_hotplug_by_probe([], root=str(tmp_path))  # nothing asked, nothing done


# --- AddSwapPath / AddSwap ---------------------------------------------------------------------


class FakeSwapLibc:
    """Stands in for swapon(2): the tests never enable swap on the host."""

    def __init__(self, fail_errno: int = 0):
        self.calls: list[tuple[bytes, int]] = []
        self.fail_errno = fail_errno

    def swapon(self, path, flags):
        self.calls.append((path, flags))
        if self.fail_errno:
            ctypes.set_errno(self.fail_errno)
            return -1
        return 0


def _swap_file(path, signature=b"SWAPSPACE2"):
    page = os.sysconf("SC_PAGE_SIZE")
    path.write_bytes(b"\0" * (page - 10) + signature + b"\0" * page)
    return path


@pytest.fixture
def fake_swapon(monkeypatch):
    fake = FakeSwapLibc()
    monkeypatch.setattr(guest, "_libc", fake)
    return fake


def test_swap_missing_file(tmp_path, fake_swapon):
    with pytest.raises(NotFound):
        guest.swapon(str(tmp_path / "swapfile"))
    with pytest.raises(InvalidArgument):
        guest.swapon("")
    assert fake_swapon.calls == []


def test_swap_refuses_what_is_not_a_swap_area(tmp_path, fake_swapon):
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 3 * os.sysconf("SC_PAGE_SIZE"))
    short = tmp_path / "short"
    short.write_bytes(b"SWAPSPACE2")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # must not block on open
    for path, why in ((plain, "not a swap area"), (short, "not a swap area"),
                      (tmp_path, "neither a regular file"), (fifo, "neither a regular file")):
        with pytest.raises(InvalidArgument, match=why):
            guest.swapon(str(path))
    assert fake_swapon.calls == []


def test_swap_area_is_passed_to_swapon(tmp_path, fake_swapon):
    path = _swap_file(tmp_path / "swapfile")
    guest.swapon(str(path))
    assert fake_swapon.calls == [(os.fsencode(str(path)), 0)]


def test_swapon_errno_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "_libc", FakeSwapLibc(errno.EPERM))
    with pytest.raises(PermissionDenied, match="swapon"):
        guest.swapon(str(_swap_file(tmp_path / "swapfile")))


def test_pci_path_text():
    assert guest.pci_path_text([2]) == "02"
    assert guest.pci_path_text([1, 0x1F]) == "01/1f"
    for bad in ([], [32], [-1]):
        with pytest.raises(InvalidArgument):
            guest.pci_path_text(bad)

