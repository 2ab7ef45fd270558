"""Device kinds: from what the host sent (``Device.type``, ``id``, ``vm_path``, ``options``)
to the guest's device node (or network interface), as upstream's ``device/*.rs``.

Each handler first looks in sysfs (or /dev) for a device that was there before the agent
started — no uevent will ever come for it — and otherwise waits on the DeviceRegistry,
which also finds events that arrived since the listener started.  A wait that runs out
raises DeadlineExceeded naming the device.  sysfs and /dev are parameters (``sysfs_root``
defaults to the registry's, ``dev_root`` to "/dev") so that tests run on fake trees.

``add_devices`` is what CreateContainer calls: one handler per device, then the OCI spec
patched for all of them at once (kagent.devices.spec).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kagent.devices import pci
from kagent.devices.registry import DeviceRegistry
from kagent.devices.spec import DeviceUpdate, apply_updates, device_update, update_spec_devices
from kagent.devices.uevent_defs import Uevent
from kagent.errors import FailedPrecondition, InvalidArgument, Unimplemented
from kagent.log import get_logger

__all__ = [
    "BLK_PCI", "BLK_MMIO", "SCSI", "NVDIMM", "VFIO_PCI", "VFIO_PCI_GK",
    "DeviceResult", "VfioResult", "add_device", "add_devices",
    "virtio_blk_pci", "virtio_blk_mmio", "scsi", "nvdimm", "vfio_pci", "net_pci",
    "wait_for_pci_device", "update_spec_devices",
]

log = get_logger("device")

# Device.type values (kata-types device.rs)
BLK_PCI = "blk"
BLK_MMIO = "mmioblk"
SCSI = "scsi"
NVDIMM = "nvdimm"
VFIO_PCI = "vfio-pci"
VFIO_PCI_GK = "vfio-pci-gk"
_S390X_ONLY = ("blk-ccw", "vfio-ap", "vfio-ap-cold")

ACPI_DEV_PATH = "/devices/LNXSYSTM"  # where the kernel puts ACPI (NVDIMM) devices
DEV = "/dev"


def _sysfs(registry: DeviceRegistry, sysfs_root: str | None) -> str:
    return registry.sysfs_root if sysfs_root is None else sysfs_root


def _dev_name(vm_path: str, kind: str) -> str:
    """``/dev/vdb`` → ``vdb``; the host must name a node directly under /dev."""
    name = vm_path[len("/dev/"):] if isinstance(vm_path, str) and vm_path.startswith("/dev/") else ""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"{kind} path {vm_path!r} must be /dev/<name>")
    return name


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# --- block devices ----------------------------------------------------------------------------


async def virtio_blk_pci(registry: DeviceRegistry, pci_path: str, *, sysfs_root: str | None = None,
                         dev_root: str = DEV, timeout: float | None = None) -> str:
    """A virtio-blk disk by PCI path (``Device.id``, e.g. "02/01") → its node, /dev/vdX."""
    sysfs = _sysfs(registry, sysfs_root)
    dev = pci.resolve(pci_path, sysfs)
    # Present before the agent started: <device>/virtioN/block/<name>.
    for virtio in _listdir(dev.sysfs_path):
        if re.fullmatch(r"virtio[0-9]+", virtio):
            names = _listdir(os.path.join(dev.sysfs_path, virtio, "block"))
            if names:
                return os.path.join(dev_root, names[0])
    pattern = re.compile(re.escape(dev.devpath) + r"/virtio[0-9]+/block/[^/]+")

    def match(u: Uevent) -> bool:
        return u.subsystem == "block" and bool(u.devname) and pattern.fullmatch(u.devpath) is not None

    uev = await registry.wait_for(match, timeout, f"block device at PCI path {pci_path}")
    return os.path.join(dev_root, uev.devname)


async def _wait_named_block(registry: DeviceRegistry, name: str, *, prefix: str,
                            what: str, timeout: float | None) -> None:
    suffix = "/block/" + name

    def match(u: Uevent) -> bool:
        return (u.subsystem == "block" and bool(u.devname) and u.devpath.startswith(prefix)
                and u.devpath.endswith(suffix))

    uev = await registry.wait_for(match, timeout, what)
    if uev.devname != name:
        raise FailedPrecondition(f"unexpected device name {uev.devname} for {what}")


async def virtio_blk_mmio(registry: DeviceRegistry, vm_path: str, *, dev_root: str = DEV,
                          timeout: float | None = None) -> str:
    """A virtio-mmio disk: the host names the node (``Device.vm_path`` = /dev/vdX)."""
    name = _dev_name(vm_path, "virtio-mmio block device")
    node = os.path.join(dev_root, name)
    if not os.path.exists(node):
        await _wait_named_block(registry, name, prefix="/", timeout=timeout,
                                what=f"virtio-mmio block device {vm_path}")
    return node


async def nvdimm(registry: DeviceRegistry, vm_path: str, *, dev_root: str = DEV,
                 timeout: float | None = None) -> str:
    """An NVDIMM (pmem) disk: /dev/pmemN, on the ACPI bus."""
    name = _dev_name(vm_path, "nvdimm device")
    node = os.path.join(dev_root, name)
    if not os.path.exists(node):
        await _wait_named_block(registry, name, prefix=ACPI_DEV_PATH, timeout=timeout,
                                what=f"pmem device {vm_path}")
    return node


async def scsi(registry: DeviceRegistry, scsi_addr: str, *, sysfs_root: str | None = None,
               dev_root: str = DEV, timeout: float | None = None) -> str:
    """A SCSI disk by address ``"<scsi id>:<lun>"`` (channel 0 of host 0, as upstream)."""
    target, sep, lun = scsi_addr.partition(":") if isinstance(scsi_addr, str) else ("", "", "")
    if not all(0 < len(n) <= 10 and n.isascii() and n.isdigit() for n in (target, lun)) or not sep:
        raise InvalidArgument(f"SCSI address {scsi_addr!r} should have the format SCSIID:LUN")
    target, lun = str(int(target)), str(int(lun))
    sysfs = _sysfs(registry, sysfs_root)
    hctl = f"0:0:{target}:{lun}"
    names = _listdir(os.path.join(sysfs, "bus", "scsi", "devices", hctl, "block"))
    if names:
        return os.path.join(dev_root, names[0])
    _scan_scsi_hosts(sysfs, f"0 {target} {lun}")
    pattern = re.compile(r".*/" + re.escape(hctl) + r"/block/[^/]+")

    def match(u: Uevent) -> bool:
        return u.subsystem == "block" and bool(u.devname) and pattern.fullmatch(u.devpath) is not None

    uev = await registry.wait_for(match, timeout, f"SCSI device {scsi_addr}")
    return os.path.join(dev_root, uev.devname)


def _scan_scsi_hosts(sysfs: str, scan: str) -> None:
    hosts_dir = os.path.join(sysfs, "class", "scsi_host")
    hosts = _listdir(hosts_dir)
    if not hosts:
        raise FailedPrecondition(f"no SCSI host in {hosts_dir} to scan")
    for host in hosts:
        path = os.path.join(hosts_dir, host, "scan")
        try:
            with open(path, "w") as f:
                f.write(scan)
        except OSError as exc:
            raise FailedPrecondition(f"cannot scan SCSI host {host}: {exc.strerror}") from None


# --- PCI, VFIO and network ---------------------------------------------------------------------


async def wait_for_pci_device(registry: DeviceRegistry, pci_path: str, *,
                              sysfs_root: str | None = None,
                              timeout: float | None = None) -> pci.Address:
    """The guest PCI address at ``pci_path``, once the device is there."""
    dev = pci.resolve(pci_path, _sysfs(registry, sysfs_root))
    if not dev.exists():
        await registry.wait_for(lambda u: u.devpath == dev.devpath, timeout,
                                f"PCI device at PCI path {pci_path}")
    return dev.address


def _write(path: str, value: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise FailedPrecondition(f"{what}: writing {path}: {exc.strerror}") from None


def pci_driver_override(sysfs: str, addr: pci.Address, driver: str) -> None:
    """Bind ``addr`` to ``driver`` (what ``driverctl set-override`` does)."""
    devdir = os.path.join(sysfs, "bus", "pci", "devices", str(addr))
    _write(os.path.join(devdir, "driver_override"), driver, f"override the driver of {addr}")
    drvlink = os.path.join(devdir, "driver")
    try:
        current = os.path.basename(os.readlink(drvlink))
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the driver of {addr}: {exc.strerror}") from None
    if current == driver:
        return
    if current is not None:
        _write(os.path.join(drvlink, "unbind"), str(addr), f"unbind {addr} from {current}")
    _write(os.path.join(sysfs, "bus", "pci", "drivers_probe"), str(addr), f"probe {addr}")


def pci_iommu_group(sysfs: str, addr: pci.Address) -> int | None:
    link = os.path.join(sysfs, "bus", "pci", "devices", str(addr), "iommu_group")
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {link}: {exc.strerror}") from None
    name = os.path.basename(target)
    if not (name.isascii() and name.isdigit()):
        raise FailedPrecondition(f"unexpected IOMMU group link {link} -> {target}")
    return int(name)


@dataclass
class VfioResult:
    node_path: str | None  # /dev/vfio/<group>; None for vfio-pci-gk (a guest driver owns it)
    pci_map: list[tuple[pci.Address, pci.Address]] = field(default_factory=list)  # host → guest


async def vfio_pci(registry: DeviceRegistry, options: Iterable[str], *, guest_kernel: bool = False,
                   sysfs_root: str | None = None, dev_root: str = DEV,
                   timeout: float | None = None) -> VfioResult:
    """VFIO PCI devices, options ``"<host BDF>=<guest PCI path>"``, all in one IOMMU group.

    vfio-pci: each device is bound to vfio-pci and the group's node /dev/vfio/<group> is
    returned; vfio-pci-gk (``guest_kernel``) leaves the devices to their guest drivers.
    """
    sysfs = _sysfs(registry, sysfs_root)
    result = VfioResult(None)
    group: int | None = None
    for opt in options:
        parts = opt.split("=") if isinstance(opt, str) else []
        if len(parts) != 2:
            raise InvalidArgument(f"malformed VFIO PCI option {opt!r}: expected <host BDF>=<PCI path>")
        host_s, path_s = parts
        if not path_s:  # a device the host did not place in the guest
            continue
        host = pci.Address.parse(host_s)
        guest = await wait_for_pci_device(registry, path_s, sysfs_root=sysfs, timeout=timeout)
        if not guest_kernel:
            pci_driver_override(sysfs, guest, "vfio-pci")
            devgroup = pci_iommu_group(sysfs, guest)
            if devgroup is None:
                raise FailedPrecondition(f"{guest} has no IOMMU group")
            if group is not None and devgroup != group:
                raise FailedPrecondition(f"{guest} is not in guest IOMMU group {group}")
            group = devgroup
        result.pci_map.append((host, guest))
    if not guest_kernel:
        if group is None:
            raise InvalidArgument("no VFIO PCI device placed in the guest")
        result.node_path = await _vfio_group_node(registry, group, sysfs, dev_root, timeout)
    return result


async def _vfio_group_node(registry: DeviceRegistry, group: int, sysfs: str, dev_root: str,
                           timeout: float | None) -> str:
    devpath = f"/devices/virtual/vfio/{group}"
    if os.path.isdir(sysfs + devpath):
        return os.path.join(dev_root, "vfio", str(group))
    uev = await registry.wait_for(lambda u: u.devpath == devpath, timeout, f"VFIO group {group}")
    return os.path.join(dev_root, uev.devname or f"vfio/{group}")


async def net_pci(registry: DeviceRegistry, pci_path: str, *, sysfs_root: str | None = None,
                  timeout: float | None = None) -> str:
    """The network interface name of the NIC at ``pci_path``."""
    sysfs = _sysfs(registry, sysfs_root)
    dev = pci.resolve(pci_path, sysfs)
    below = dev.devpath + "/"
    net_dir = os.path.join(sysfs, "class", "net")
    for name in _listdir(net_dir):  # cold-plugged: class/net/<if> → ../../devices/.../net/<if>
        try:
            target = os.readlink(os.path.join(net_dir, name))
        except OSError:
            continue
        at = target.find(below)
        if at >= 0 and re.fullmatch(r"(?:[^/]+/)*net/" + re.escape(name), target[at + len(below):]):
            return name

    def match(u: Uevent) -> bool:
        return u.subsystem == "net" and bool(u.interface) and u.devpath.startswith(below)

    uev = await registry.wait_for(match, timeout, f"network device at PCI path {pci_path}")
    return uev.interface


# --- Device → handler → spec ------------------------------------------------------------------


class DeviceLike(Protocol):  # agent_pb2.Device, or anything shaped like it
    id: str
    type: str
    vm_path: str
    container_path: str
    options: Any


@dataclass
class DeviceResult:
    update: DeviceUpdate | None  # how the spec is patched (None: nothing to patch)
    pci_map: list[tuple[pci.Address, pci.Address]] = field(default_factory=list)


async def add_device(registry: DeviceRegistry, device: DeviceLike, *,
                     sysfs_root: str | None = None, dev_root: str = DEV) -> DeviceResult:
    """Find ``device`` in the guest; what to patch into the container's spec."""
    kind, dev_id, vm_path, cpath = device.type, device.id, device.vm_path, device.container_path
    log.info("adding device", device_id=dev_id, device_type=kind, vm_path=vm_path,
             container_path=cpath, options=list(device.options))
    if not kind:
        raise InvalidArgument(f"invalid type for device {dev_id or vm_path!r}")
    if not dev_id and not vm_path:
        raise InvalidArgument(f"invalid ID and VM path for device of type {kind}")
    if not cpath:
        raise InvalidArgument(f"invalid container path for device {dev_id or vm_path!r}")
    roots: dict[str, Any] = {"dev_root": dev_root}
    if kind == BLK_PCI:
        node = await virtio_blk_pci(registry, dev_id, sysfs_root=sysfs_root, **roots)
    elif kind == BLK_MMIO:
        node = await virtio_blk_mmio(registry, vm_path, **roots)
    elif kind == SCSI:
        node = await scsi(registry, dev_id, sysfs_root=sysfs_root, **roots)
    elif kind == NVDIMM:
        node = await nvdimm(registry, vm_path, **roots)
    elif kind in (VFIO_PCI, VFIO_PCI_GK):
        res = await vfio_pci(registry, device.options, guest_kernel=kind == VFIO_PCI_GK,
                             sysfs_root=sysfs_root, **roots)
        update = None
        if res.node_path is not None:  # the container sees the guest's group number
            update = device_update(cpath, res.node_path, final_path=res.node_path)
        return DeviceResult(update, res.pci_map)
    elif kind in _S390X_ONLY:
        raise Unimplemented(f"device type {kind} is only supported on s390x")
    else:
        raise InvalidArgument(f"no handler for device type {kind!r}")
    return DeviceResult(device_update(cpath, node))


async def add_devices(registry: DeviceRegistry, devices: Iterable[DeviceLike], spec: dict, *,
                      sysfs_root: str | None = None,
                      dev_root: str = DEV) -> list[tuple[pci.Address, pci.Address]]:
    """Add every device and patch ``spec``; returns the host → guest PCI address map."""
    updates: list[DeviceUpdate] = []
    pci_map: dict[pci.Address, pci.Address] = {}
    for device in devices:
        res = await add_device(registry, device, sysfs_root=sysfs_root, dev_root=dev_root)
        if res.update is not None:
            updates.append(res.update)
        for host, guest in res.pci_map:
            if pci_map.setdefault(host, guest) != guest:
                raise InvalidArgument(
                    f"conflicting guest address for host device {host} ({guest} versus {pci_map[host]})")
    apply_updates(spec, updates)
    return list(pci_map.items())
