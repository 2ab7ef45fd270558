"""virtio-fs and 9p: the host's shared directory (``kataShared``) and volumes on it.

virtio-fs is a plain mount (fstype ``virtiofs``, maybe ``dax``).  9p is gone from the
upstream agent, but seed-era host runtimes (``shared_fs=virtio-9p``) still send it:
``mount -t 9p`` over the virtio transport with the options given.
"""

from __future__ import annotations

import asyncio

from kagent.storage.common import Device, StorageSpec, mount_storage, option_value
from kagent.storage.context import Context

VIRTIO_FS = "virtio-fs"
NINE_P = "9p"


class VirtioFsHandler:
    drivers = (VIRTIO_FS,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        return await asyncio.to_thread(mount_storage, spec, fstype=spec.fstype or "virtiofs",
                                       mountinfo_path=ctx.paths.mountinfo)


def nine_p_options(options: tuple[str, ...]) -> list[str]:
    """The host's options, over virtio unless it named a transport (9p's default is not virtio)."""
    out = list(options)
    if option_value(out, "trans") is None:
        out.append("trans=virtio")
    return out


class NinePHandler:
    drivers = (NINE_P,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        return await asyncio.to_thread(mount_storage, spec, fstype=spec.fstype or "9p",
                                       options=nine_p_options(spec.options),
                                       mountinfo_path=ctx.paths.mountinfo)
