"""overlayfs: an overlay mount, e.g. a container rootfs over a read-only lower layer.

- ``io.katacontainers.fs-opt.overlay-rw`` among the options: the container gets a
  writable layer of its own, ``<run_dir>/<cid>/upper`` and ``work`` (created here);
- driver option ``io.katacontainers.volume.overlayfs.create_directory=<dir>`` (any
  number): directories to create before mounting, typically upper and work on a tmpfs.
"""

from __future__ import annotations

import asyncio
import os

from kagent.errors import InvalidArgument
from kagent.storage.common import (
    Device,
    StorageSpec,
    check_path,
    make_dirs,
    mount_storage,
    storage_error,
)
from kagent.storage.context import Context

OVERLAYFS = "overlayfs"
OVERLAY_RW = "io.katacontainers.fs-opt.overlay-rw"
CREATE_DIRECTORY = "io.katacontainers.volume.overlayfs.create_directory"


def _mount_overlay(spec: StorageSpec, ctx: Context) -> Device:
    options = [o for o in spec.options if o != OVERLAY_RW]
    to_create = []
    for opt in spec.driver_options:
        key, sep, value = opt.partition("=")
        if sep and key == CREATE_DIRECTORY:
            to_create.append(check_path(value, f"overlayfs {CREATE_DIRECTORY}"))
    if OVERLAY_RW in spec.options:
        cid = ctx.container_id
        if cid is None:
            raise InvalidArgument(f"overlayfs storage {spec.mount_point}: {OVERLAY_RW} needs a container")
        base = os.path.join(ctx.paths.run_dir, cid)
        upper, work = os.path.join(base, "upper"), os.path.join(base, "work")
        to_create += [upper, work]
        options += [f"upperdir={upper}", f"workdir={work}"]
    created: list[str] = []
    try:
        for d in to_create:
            created += make_dirs(d)
    except OSError as exc:
        Device(OVERLAYFS, spec.mount_point, created=created).release_sync()
        raise storage_error(exc, f"overlayfs storage {spec.mount_point}: create {d}") from None
    try:
        fstype = "overlay" if OVERLAY_RW in spec.options else spec.fstype or "overlay"
        dev = mount_storage(spec, source=spec.source or "overlay", fstype=fstype, options=options,
                            mountinfo_path=ctx.paths.mountinfo)
    except BaseException:
        Device(OVERLAYFS, spec.mount_point, created=created).release_sync()
        raise
    dev.created = created + dev.created  # the layers are removed last, and only if empty
    return dev


class OverlayfsHandler:
    drivers = (OVERLAYFS,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        return await asyncio.to_thread(_mount_overlay, spec, ctx)
