"""Disks: blk (virtio-blk on PCI), mmioblk, scsi and nvdimm.

Each finds the disk's node first — already there, or waited for through the device
layer (``kagent.devices.handlers``, bounded by the hotplug timeout) — then mounts it
like any other storage.  ``blk`` takes either a /dev path (cold-plugged, must be a block
device) or a PCI path such as ``02/01``.
"""

from __future__ import annotations

import asyncio
import os
import stat

from kagent.devices import handlers
from kagent.errors import InvalidArgument
from kagent.storage.common import Device, StorageSpec, mount_storage, storage_error
from kagent.storage.context import Context

BLK = "blk"
MMIO_BLK = "mmioblk"
SCSI = "scsi"
NVDIMM = "nvdimm"


def check_block_device(path: str, driver: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise storage_error(exc, f"{driver} storage: device {path}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgument(f"{driver} storage: {path} is not a block device")


async def _mount_node(spec: StorageSpec, node: str, ctx: Context) -> Device:
    check_block_device(node, spec.driver)
    return await asyncio.to_thread(mount_storage, spec, source=node, mountinfo_path=ctx.paths.mountinfo)


class VirtioBlkPciHandler:
    drivers = (BLK,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        if spec.source.startswith("/"):
            node = spec.source
        else:
            node = await handlers.virtio_blk_pci(ctx.registry(BLK), spec.source,
                                                 dev_root=ctx.paths.dev_root, timeout=ctx.hotplug_timeout)
        return await _mount_node(spec, node, ctx)


class VirtioBlkMmioHandler:
    drivers = (MMIO_BLK,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        node = spec.source
        if not os.path.exists(node):
            node = await handlers.virtio_blk_mmio(ctx.registry(MMIO_BLK), spec.source,
                                                  dev_root=ctx.paths.dev_root, timeout=ctx.hotplug_timeout)
        return await _mount_node(spec, node, ctx)


class ScsiHandler:
    drivers = (SCSI,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        node = await handlers.scsi(ctx.registry(SCSI), spec.source, dev_root=ctx.paths.dev_root,
                                   timeout=ctx.hotplug_timeout)
        return await _mount_node(spec, node, ctx)


class PmemHandler:
    drivers = (NVDIMM,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        node = await handlers.nvdimm(ctx.registry(NVDIMM), spec.source, dev_root=ctx.paths.dev_root,
                                     timeout=ctx.hotplug_timeout)
        return await _mount_node(spec, node, ctx)
