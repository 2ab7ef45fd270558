"""Storage.driver → the handler that serves it.

A handler is any object with ``drivers`` (the names it serves) and
``async create(spec, ctx) -> Device``.  The names are upstream's, plus ``9p`` (removed
upstream, still sent by seed-era runtimes) and ``bind``.
"""

from __future__ import annotations

from typing import Protocol

from kagent.errors import InvalidArgument
from kagent.storage.bind import BindHandler
from kagent.storage.block import PmemHandler, ScsiHandler, VirtioBlkMmioHandler, VirtioBlkPciHandler
from kagent.storage.common import Device, StorageSpec
from kagent.storage.context import Context
from kagent.storage.ephemeral import EphemeralHandler
from kagent.storage.local import LocalHandler
from kagent.storage.overlay import OverlayfsHandler
from kagent.storage.sharedfs import NinePHandler, VirtioFsHandler
from kagent.storage.watchable import BindWatcherHandler


class Handler(Protocol):
    drivers: tuple[str, ...]

    async def create(self, spec: StorageSpec, ctx: Context) -> Device: ...


HANDLERS: tuple[Handler, ...] = (
    NinePHandler(),
    VirtioBlkMmioHandler(),
    VirtioBlkPciHandler(),
    EphemeralHandler(),
    LocalHandler(),
    PmemHandler(),
    OverlayfsHandler(),
    ScsiHandler(),
    VirtioFsHandler(),
    BindWatcherHandler(),
    BindHandler(),
)

_BY_DRIVER: dict[str, Handler] = {name: h for h in HANDLERS for name in h.drivers}


def handler_for(driver: str) -> Handler:
    handler = _BY_DRIVER.get(driver)
    if handler is None:
        raise InvalidArgument(f"no storage handler for driver {driver!r} "
                              f"(supported: {', '.join(handler_names())})")
    return handler


def handler_names() -> list[str]:
    """The driver names, for AgentDetails.storage_handlers."""
    return list(_BY_DRIVER)
