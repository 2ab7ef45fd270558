"""PCI addresses and PCI paths, and their resolution to sysfs.

A PCI path names a device by the slot (and function) it sits in on each bus from the
root complex down, through bridges: ``"02/01"`` is slot 1 on the bus behind the bridge
in slot 2 of the root bus.  Each element is ``SS[.F]`` in hex (slot 0..1f, function 0..7).
The host runtime sends this as ``Device.id``: the guest's bus numbers are not known to it.

A first element ≥ 0x20 followed by at least two more is a pxb-pcie NUMA root complex:
``"20/00/02"`` is path ``00/02`` under root complex ``pci0000:20``; anything else is under
root complex ``00``.  (Upstream resolves the first hop of a pxb path on bus 00; kagent
starts on the root complex's own bus number, which is where the kernel puts the devices
of a pxb-pcie root bus.)

Resolution walks sysfs from ``<sysfs>/devices/pci0000:<rc>``: each bridge's downstream
bus is the single entry of its ``pci_bus/`` directory (or, when that is missing, the bus
shared by the PCI devices below it).  Everything takes a ``sysfs_root`` so tests can run
against a fake tree.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from kagent.errors import FailedPrecondition, InvalidArgument, NotFound

SYSFS = "/sys"
SLOT_MAX = 0x1F
FUNCTION_MAX = 0x7
PXB_PCIE_ROOT_BUS_MIN = 0x20


def _hex(text: str, what: str, limit: int) -> int:
    # int(x, 16) also takes "0x", "+", "_" and spaces: a path element is plain hex digits.
    if not text or len(text) > 4 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise InvalidArgument(f"{what} {text!r} is not a hex number")
    value = int(text, 16)
    if value > limit:
        raise InvalidArgument(f"{what} {text!r} is out of range [0..{limit:#x}]")
    return value


@dataclass(frozen=True, order=True)
class SlotFn:
    """A device's slot and function on one bus: ``SS.F``."""

    slot: int
    function: int = 0

    @classmethod
    def parse(cls, text: str) -> SlotFn:
        slot, dot, func = text.partition(".")
        if dot and ("." in func or not func):
            raise InvalidArgument(f"PCI slot/function {text!r} should have the format SS[.F]")
        return cls(_hex(slot, "PCI slot", SLOT_MAX), _hex(func, "PCI function", FUNCTION_MAX) if dot else 0)

    def __str__(self) -> str:
        return f"{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True, order=True)
class Address:
    """A PCI address as sysfs names it: ``DDDD:BB:SS.F``."""

    domain: int
    bus: int
    slotfn: SlotFn

    @classmethod
    def parse(cls, text: str) -> Address:
        parts = text.split(":")
        if len(parts) != 3:
            raise InvalidArgument(f"PCI address {text!r} should have the format DDDD:BB:SS.F")
        return cls(_hex(parts[0], "PCI domain", 0xFFFF), _hex(parts[1], "PCI bus", 0xFF),
                   SlotFn.parse(parts[2]))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slotfn}"

    @property
    def bus_name(self) -> str:
        """``DDDD:BB``, as in a bridge's ``pci_bus/`` directory."""
        return f"{self.domain:04x}:{self.bus:02x}"


def parse_path(text: str) -> tuple[SlotFn, ...]:
    """``"02/01.3"`` → (SlotFn(2, 0), SlotFn(1, 3)); at least one element."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("PCI path must have at least one element")
    return tuple(SlotFn.parse(part) for part in text.split("/"))


def format_path(path: tuple[SlotFn, ...]) -> str:
    return "/".join(str(s) for s in path)


def parse_device_path(text: str) -> tuple[str, tuple[SlotFn, ...]]:
    """A ``Device.id`` PCI path → (root complex as two hex digits, PCI path under it)."""
    segments = text.split("/") if isinstance(text, str) else []
    if len(segments) >= 3:
        try:
            first = _hex(segments[0], "PCI root complex", 0xFF)
        except InvalidArgument:
            first = -1
        if first >= PXB_PCIE_ROOT_BUS_MIN:
            return f"{first:02x}", parse_path("/".join(segments[1:]))
    return "00", parse_path(text)


def root_bus_path(root_complex: str = "00", sysfs_root: str = SYSFS,
                  machine: str | None = None) -> str:
    """The root bus's devpath: ``/devices/pci0000:<rc>``, or under a platform device on arm64."""
    acpi = f"/devices/pci0000:{root_complex}"
    if (machine or platform.machine()) not in ("aarch64", "arm64"):
        return acpi
    # arm64: ACPI guests put it at the top; device-tree guests under a platform device whose
    # name depends on the VMM ("4010000000.pcie" on QEMU virt, "30000000.pci" on CLH).
    if os.path.isdir(sysfs_root + acpi):
        return acpi
    platform_dir = os.path.join(sysfs_root, "devices", "platform")
    try:
        names = sorted(os.listdir(platform_dir))
    except OSError:
        names = []
    for name in names:
        if os.path.isdir(os.path.join(platform_dir, name, f"pci0000:{root_complex}")):
            return f"/devices/platform/{name}/pci0000:{root_complex}"
    return f"/devices/platform/4010000000.pcie/pci0000:{root_complex}"


def _downstream_bus(devdir: str, bdf: str) -> str:
    """The bus behind the bridge at ``devdir``: ``DDDD:BB``."""
    busdir = os.path.join(devdir, "pci_bus")
    try:
        names = os.listdir(busdir)
    except FileNotFoundError:
        names = None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {busdir}: {exc.strerror}") from None
    if names is not None:
        if len(names) != 1:
            raise FailedPrecondition(f"expected exactly one PCI bus in {busdir}, found {len(names)}")
        return names[0]
    # No pci_bus/ directory (seen with some bridges): the bus of the devices below it.
    try:
        children = os.listdir(devdir)
    except FileNotFoundError:
        raise NotFound(f"PCI bridge {bdf} not found at {devdir}") from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {devdir}: {exc.strerror}") from None
    buses = set()
    for name in children:
        try:
            buses.add(Address.parse(name).bus_name)
        except InvalidArgument:
            continue
    if len(buses) != 1:
        raise FailedPrecondition(
            f"cannot tell the bus behind PCI bridge {bdf}: "
            + (f"devices on {len(buses)} buses below it" if buses else "no pci_bus/ and no devices below it")
        )
    return buses.pop()


def pcipath_to_sysfs(root_bus_sysfs: str, path: tuple[SlotFn, ...], root_complex: str = "00") -> str:
    """The device's path relative to the root bus directory: ``/0000:00:02.0/0000:01:01.0``.

    Only the bridges on the way are looked at; the final device need not exist yet
    (a hot-plugged device appears there when its uevent is sent).
    """
    if not path:
        raise InvalidArgument("PCI path must have at least one element")
    bus = f"0000:{root_complex}"
    rel = ""
    for i, slotfn in enumerate(path):
        bdf = f"{bus}:{slotfn}"
        rel = f"{rel}/{bdf}"
        if i < len(path) - 1:
            bus = _downstream_bus(root_bus_sysfs + rel, bdf)
    return rel


@dataclass(frozen=True)
class PciDevice:
    """Where a PCI path leads: its devpath (as uevents name it) and its address."""

    root_complex: str
    path: tuple[SlotFn, ...]
    devpath: str  # /devices/pci0000:00/0000:00:02.0/0000:01:01.0
    sysfs_root: str

    @property
    def sysfs_path(self) -> str:
        return self.sysfs_root + self.devpath

    @property
    def address(self) -> Address:
        return Address.parse(self.devpath.rsplit("/", 1)[-1])

    def exists(self) -> bool:
        return os.path.isdir(self.sysfs_path)


def resolve(device_path: str, sysfs_root: str = SYSFS, machine: str | None = None) -> PciDevice:
    """Resolve a ``Device.id`` PCI path (``"02/01"``, ``"20/00/02"``) through its bridges."""
    root_complex, path = parse_device_path(device_path)
    root = root_bus_path(root_complex, sysfs_root, machine)
    rel = pcipath_to_sysfs(sysfs_root + root, path, root_complex)
    return PciDevice(root_complex, path, root + rel, sysfs_root)
