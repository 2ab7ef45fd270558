"""Storage.driver → the handler that serves it.

A handler is any object with ``drivers`` (the names it serves) and
``async create(spec, ctx) -> Device``.  The names are upstream's, plus ``9p`` (removed
upstream, still sent by seed-era runtimes) and ``bind``.

A driver's module is imported when a storage of its kind is first asked for: most pods
use two or three drivers, and importing all of them would lengthen the agent's start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from kagent.errors import InvalidArgument

if TYPE_CHECKING:
    from kagent.storage.common import Device, StorageSpec
    from kagent.storage.context import Context


class Handler(Protocol):
    drivers: tuple[str, ...]

    async def create(self, spec: StorageSpec, ctx: Context) -> Device: ...


# driver → (module in kagent.storage, handler class), in AgentDetails.storage_handlers order
_DRIVERS: dict[str, tuple[str, str]] = {
    "9p": ("sharedfs", "NinePHandler"),
    "mmioblk": ("block", "VirtioBlkMmioHandler"),
    "blk": ("block", "VirtioBlkPciHandler"),
    "ephemeral": ("ephemeral", "EphemeralHandler"),
    "local": ("local", "LocalHandler"),
    "nvdimm": ("block", "PmemHandler"),
    "overlayfs": ("overlay", "OverlayfsHandler"),
    "scsi": ("block", "ScsiHandler"),
    "virtio-fs": ("sharedfs", "VirtioFsHandler"),
    "watchable-bind": ("watchable", "BindWatcherHandler"),
    "bind": ("bind", "BindHandler"),
}
_handlers: dict[str, Handler] = {}


def handler_for(driver: str) -> Handler:
    handler = _handlers.get(driver)
    if handler is None:
        where = _DRIVERS.get(driver)
        if where is None:
            raise InvalidArgument(f"no storage handler for driver {driver!r} "
                                  f"(supported: {', '.join(handler_names())})")
        module, name = where
        cls = getattr(importlib.import_module(f"kagent.storage.{module}"), name)
        handler = _handlers[driver] = cls()
    return handler


def handler_names() -> list[str]:
    """The driver names, for AgentDetails.storage_handlers."""
    return list(_DRIVERS)
