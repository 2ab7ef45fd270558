"""bind: a plain bind mount of a guest path (``ro`` applied by a remount)."""

from __future__ import annotations

import asyncio

from kagent.errors import InvalidArgument
from kagent.storage.common import Device, StorageSpec, mount_storage
from kagent.storage.context import Context

BIND = "bind"


class BindHandler:
    drivers = (BIND,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        if not spec.source.startswith("/"):
            raise InvalidArgument(f"bind storage at {spec.mount_point}: source {spec.source!r} "
                                  "must be an absolute path")
        options = spec.options
        if not any(o in ("bind", "rbind") for o in options):
            options = ("bind", *options)
        return await asyncio.to_thread(mount_storage, spec, fstype="bind", options=options,
                                       mountinfo_path=ctx.paths.mountinfo)
