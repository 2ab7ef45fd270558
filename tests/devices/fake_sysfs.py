"""A fake /sys (and /dev) tree in a temporary directory, shaped like a QEMU guest's.

The device handlers read and write sysfs; here they get a directory tree of the same shape
instead (the real thing — hot-plugged PCI devices, SCSI hosts, IOMMU groups — does not
exist on these machines, and writing the real files would touch the host's devices).
"""

from __future__ import annotations

import os


class FakeSysfs:
    def __init__(self, root: str) -> None:
        self.root = root
        self.sys = os.path.join(root, "sys")
        self.dev = os.path.join(root, "dev")
        os.makedirs(self.sys)
        os.makedirs(self.dev)

    def path(self, rel: str) -> str:
        return self.sys + rel

    def mkdir(self, rel: str) -> str:
        p = self.path(rel)
        os.makedirs(p, exist_ok=True)
        return p

    def write(self, rel: str, text: str = "") -> str:
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        return p

    def read(self, rel: str) -> str:
        with open(self.path(rel)) as f:
            return f.read()

    def link(self, rel: str, target: str) -> None:
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink(target, p)

    # --- PCI ----------------------------------------------------------------------------------

    def pci_bridge(self, devpath: str, bus: str) -> None:
        """A bridge at ``devpath`` whose downstream bus is ``bus`` ("0000:01")."""
        self.pci_device(devpath)
        self.mkdir(f"{devpath}/pci_bus/{bus}")

    def pci_device(self, devpath: str) -> None:
        """A PCI function at ``devpath`` (/devices/pci0000:00/.../0000:01:01.0), with its
        /sys/bus/pci/devices link, driver_override and no driver."""
        self.mkdir(devpath)
        self.write(f"{devpath}/driver_override", "(null)\n")
        addr = devpath.rsplit("/", 1)[1]
        self.link(f"/bus/pci/devices/{addr}", "../../.." + devpath)
        self.write("/bus/pci/drivers_probe")

    def bind_driver(self, devpath: str, driver: str) -> None:
        self.write(f"/bus/pci/drivers/{driver}/unbind")
        self.link(f"{devpath}/driver", f"../../../../bus/pci/drivers/{driver}")

    def iommu_group(self, devpath: str, group: int) -> None:
        self.mkdir(f"/kernel/iommu_groups/{group}")
        depth = devpath.count("/")
        self.link(f"{devpath}/iommu_group", "../" * depth + f"kernel/iommu_groups/{group}")

    # --- block, SCSI, net, memory -------------------------------------------------------------

    def block(self, devpath: str) -> None:
        """``.../block/<name>`` for a disk the kernel already knows (cold-plugged)."""
        self.mkdir(devpath)

    def scsi_host(self, name: str = "host0") -> str:
        return self.write(f"/class/scsi_host/{name}/scan")

    def net_link(self, ifname: str, devpath: str) -> None:
        self.mkdir(devpath)
        self.link(f"/class/net/{ifname}", "../.." + devpath)

    def memory_block(self, n: int) -> str:
        return self.write(f"/devices/system/memory/memory{n}/online", "0\n")
