"""Disk drivers with a real ext4 filesystem on a loop device.

A hot-plugged virtio/SCSI/NVDIMM disk cannot exist on these machines, so where the driver
waits for one the test gives it a fake sysfs tree and injects the kernel's uevent into
the device registry (as the netlink listener would); the node it then mounts is a real
block node (mknod of the loop device's numbers) in a temporary /dev.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from storage_harness import fstype_at, run_in_mount_ns, storage

from kagent.devices.registry import DeviceRegistry
from kagent.devices.uevent import parse as parse_uevent
from kagent.errors import DeadlineExceeded, InvalidArgument
from kagent.storage import StorageManager

pytestmark = pytest.mark.root

BRIDGE = "/devices/pci0000:00/0000:00:02.0"
DISK = f"{BRIDGE}/0000:01:01.0"  # PCI path 02/01


def uevent(action: str, devpath: str, **props: str):
    fields = [f"ACTION={action}", f"DEVPATH={devpath}", *(f"{k}={v}" for k, v in props.items())]
    uev = parse_uevent(f"{action}@{devpath}\0".encode() + "\0".join(fields).encode() + b"\0")
    assert uev is not None
    return uev


def fake_tree(tmp: str) -> tuple[str, str]:
    """A sysfs with a PCI bridge at slot 02 and a SCSI host; an empty /dev."""
    sysfs, dev = f"{tmp}/sys", f"{tmp}/dev"
    os.makedirs(f"{sysfs}{BRIDGE}/pci_bus/0000:01")
    os.makedirs(f"{sysfs}/class/scsi_host/host0")
    open(f"{sysfs}/class/scsi_host/host0/scan", "w").close()
    os.makedirs(dev)
    return sysfs, dev


def node_like(loop_dev: str, path: str) -> str:
    """A block node with the loop device's numbers: the disk the "guest kernel" named."""
    os.mknod(path, stat.S_IFBLK | 0o600, os.stat(loop_dev).st_rdev)
    return path


def check_ext4(mp: str) -> None:
    assert fstype_at(mp) == "ext4"
    with open(f"{mp}/written", "w") as f:
        f.write("through the mount")
    with open(f"{mp}/written") as f:
        assert f.read() == "through the mount"


def test_blk_by_dev_path(tmp_path, ext4_loop) -> None:
    tmp = str(tmp_path)

    async def body():
        m = StorageManager(run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch")
        mp = f"{tmp}/vol"
        await m.add([storage("blk", mp, source=ext4_loop, fstype="ext4", options=["noatime"])], "c1")
        check_ext4(mp)
        await m.remove("c1")
        assert fstype_at(mp) is None and not os.path.exists(mp)
        with pytest.raises(InvalidArgument, match="not a block device"):
            await m.add([storage("blk", mp, source="/dev/null", fstype="ext4")], "c1")
        assert not os.path.exists(mp)

    run_in_mount_ns(body, roots=[tmp])


def test_blk_by_pci_path(tmp_path, ext4_loop) -> None:
    tmp = str(tmp_path)
    sysfs, dev = fake_tree(tmp)

    async def body():
        reg = DeviceRegistry(sysfs_root=sysfs, hotplug_timeout=5)
        m = StorageManager(reg, run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch", dev_root=dev)
        mp = f"{tmp}/vol"

        def hotplug():
            node_like(ext4_loop, f"{dev}/vdb")
            reg.handle(uevent("add", f"{DISK}/virtio3/block/vdb", SUBSYSTEM="block", DEVNAME="vdb"))

        asyncio.get_running_loop().call_later(0.05, hotplug)
        await m.add([storage("blk", mp, source="02/01", fstype="ext4")], "c1")
        check_ext4(mp)
        await m.remove("c1")
        assert fstype_at(mp) is None

    run_in_mount_ns(body, roots=[tmp])


def test_blk_by_pci_path_times_out(tmp_path) -> None:
    tmp = str(tmp_path)
    sysfs, dev = fake_tree(tmp)

    async def body():
        m = StorageManager(DeviceRegistry(sysfs_root=sysfs), run_dir=f"{tmp}/run", dev_root=dev,
                           hotplug_timeout=0.1)
        with pytest.raises(DeadlineExceeded, match="PCI path 02/01"):
            await m.add([storage("blk", f"{tmp}/vol", source="02/01", fstype="ext4")], "c1")
        assert not os.path.exists(f"{tmp}/vol") and m.mount_points == []

    run_in_mount_ns(body, roots=[tmp])


def test_mmioblk_scsi_and_nvdimm(tmp_path, ext4_loop) -> None:
    tmp = str(tmp_path)
    sysfs, dev = fake_tree(tmp)

    async def body():
        reg = DeviceRegistry(sysfs_root=sysfs, hotplug_timeout=5)
        m = StorageManager(reg, run_dir=f"{tmp}/run", dev_root=dev)
        loop = asyncio.get_running_loop()

        def plug(name: str, devpath: str):
            node_like(ext4_loop, f"{dev}/{name}")
            reg.handle(uevent("add", devpath, SUBSYSTEM="block", DEVNAME=name))

        # virtio-mmio: the host names the node; it appears later
        loop.call_later(0.05, plug, "vdc", "/devices/platform/a000.virtio_mmio/virtio2/block/vdc")
        await m.add([storage("mmioblk", f"{tmp}/mmio", source="/dev/vdc", fstype="ext4")], "c1")
        check_ext4(f"{tmp}/mmio")
        # SCSI: the host scan is asked for, then the disk at 0:0:1:2
        loop.call_later(0.05, plug, "sdb",
                        "/devices/pci0000:00/0000:00:03.0/virtio1/host0/target0:0:1/0:0:1:2/block/sdb")
        await m.add([storage("scsi", f"{tmp}/scsi", source="1:2", fstype="ext4")], "c2")
        check_ext4(f"{tmp}/scsi")
        with open(f"{sysfs}/class/scsi_host/host0/scan") as f:
            assert f.read() == "0 1 2"
        # NVDIMM already there
        node_like(ext4_loop, f"{dev}/pmem0")
        await m.add([storage("nvdimm", f"{tmp}/pmem", source="/dev/pmem0", fstype="ext4")], "c3")
        check_ext4(f"{tmp}/pmem")
        assert await m.destroy_all() == []
        assert all(fstype_at(f"{tmp}/{d}") is None for d in ("mmio", "scsi", "pmem"))

    run_in_mount_ns(body, roots=[tmp])
