"""The sandbox's storages: mounted on request, reference-counted per mount point.

- ``add(storages, owner)``: the owner is a container id (CreateContainer) or
  ``SANDBOX_OWNER`` (CreateSandbox).  A mount point already in use is not mounted again:
  the new user takes a reference.  If one storage fails, the references this call took
  are dropped again (and what it alone mounted is undone) before the error is raised.
- ``remove(owner)`` (RemoveContainer): drops the owner's references; a mount point
  nobody uses any more is released — umounted, and the directories we created removed —
  unless it is kept for the sandbox's lifetime: ``shared`` storages, and the emptyDir-like
  drivers (ephemeral, local) whose data must survive a container restart.
- ``destroy_all()`` (DestroySandbox): releases everything, newest first.

Concurrency: two containers may ask for the same mount point at once; the second waits
for the first's mount to finish (and fails with it).  A mount point being released is
not mounted again until the release is done, so a umount can never hit the new mount.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kagent.errors import AgentError, FailedPrecondition
from kagent.log import get_logger
from kagent.storage.common import MOUNTINFO, Device, StorageSpec
from kagent.storage.context import (
    DEV,
    RUN_DIR,
    SANDBOX_OWNER,
    SYSFS,
    WATCH_INTERVAL,
    WATCH_ROOT,
    Context,
    Paths,
)
from kagent.storage.registry import handler_for, handler_names
from kagent.storage.watchable import WatchRoot

if TYPE_CHECKING:
    from kagent.devices.registry import DeviceRegistry
    from kagent.protocols import agent_pb2

log = get_logger("storage")

__all__ = ["SANDBOX_OWNER", "StorageManager"]


class _Entry:
    __slots__ = ("mount_point", "refs", "keep", "ready", "device", "error")

    def __init__(self, mount_point: str, keep: bool) -> None:
        self.mount_point = mount_point
        self.refs = 1
        self.keep = keep
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.device: Device | None = None
        self.error: BaseException | None = None


class StorageManager:
    def __init__(self, devices: DeviceRegistry | None = None, *, run_dir: str = RUN_DIR,
                 watch_root: str = WATCH_ROOT, sysfs_root: str = SYSFS, dev_root: str = DEV,
                 mountinfo: str = MOUNTINFO, hotplug_timeout: float | None = None,
                 watch_interval: float = WATCH_INTERVAL) -> None:
        self.devices = devices
        self.paths = Paths(run_dir=run_dir, watch_root=watch_root, sysfs_root=sysfs_root,
                           dev_root=dev_root, mountinfo=mountinfo)
        self.hotplug_timeout = hotplug_timeout
        self.watch_interval = watch_interval
        self.watch_root = WatchRoot(watch_root, mountinfo)
        self._entries: dict[str, _Entry] = {}
        self._owners: dict[str, list[_Entry]] = {}
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._seq = 0

    # -- queries --------------------------------------------------------------------------

    @staticmethod
    def handler_names() -> list[str]:
        return handler_names()

    def refcount(self, mount_point: str) -> int:
        entry = self._entries.get(mount_point)
        return entry.refs if entry is not None else 0

    def device(self, mount_point: str) -> Device | None:
        entry = self._entries.get(mount_point)
        return entry.device if entry is not None else None

    @property
    def mount_points(self) -> list[str]:
        return [mp for mp, e in self._entries.items() if e.device is not None]

    def owned_by(self, owner: str) -> list[str]:
        return [e.mount_point for e in self._owners.get(owner, [])]

    # -- add ------------------------------------------------------------------------------

    async def add(self, storages: Iterable[agent_pb2.Storage], owner: str) -> list[str]:
        """Mount (or take a reference on) each storage; their mount points, in order."""
        specs = [StorageSpec.from_proto(s) for s in storages]
        for spec in specs:
            handler_for(spec.driver)  # an unknown driver fails before anything is mounted
        taken: list[_Entry] = []
        try:
            for spec in specs:
                taken.append(await self._take(spec, owner))
        except BaseException:
            try:
                await self._drop(taken)
            except AgentError as exc:
                log.error("cannot undo a storage after a failed add", owner=owner, error=exc.message)
            raise
        self._owners.setdefault(owner, []).extend(taken)
        return [spec.mount_point for spec in specs]

    async def _take(self, spec: StorageSpec, owner: str) -> _Entry:
        mp = spec.mount_point
        while True:
            pending = self._releasing.get(mp)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            entry = self._entries.get(mp)
            if entry is None:
                break
            if not entry.ready.done():
                await asyncio.shield(entry.ready)
                if entry.error is not None:
                    raise FailedPrecondition(f"storage at {mp} failed for another request: "
                                             f"{_message(entry.error)}")
                continue
            entry.refs += 1
            entry.keep |= spec.shared
            log.info("storage reused", mount_point=mp, driver=spec.driver, owner=owner, refs=entry.refs)
            return entry
        entry = _Entry(mp, keep=spec.shared)
        self._entries[mp] = entry
        try:
            device = await handler_for(spec.driver).create(spec, self._context(owner))
        except BaseException as exc:
            if self._entries.get(mp) is entry:
                del self._entries[mp]
            entry.error = exc
            entry.ready.set_result(None)
            log.error("storage failed", mount_point=mp, driver=spec.driver, owner=owner,
                      error=_message(exc))
            raise
        device.seq = self._next_seq()
        entry.device = device
        entry.keep |= device.sandbox_lifetime
        entry.ready.set_result(None)
        return entry

    def _context(self, owner: str) -> Context:
        return Context(owner=owner, paths=self.paths, devices=self.devices,
                       hotplug_timeout=self.hotplug_timeout, watch_interval=self.watch_interval,
                       watch_root=self.watch_root, next_seq=self._next_seq)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- remove ---------------------------------------------------------------------------

    async def remove(self, owner: str) -> None:
        """Drop every reference ``owner`` holds; release what nobody uses any more."""
        await self._drop(self._owners.pop(owner, []))

    async def _drop(self, entries: list[_Entry]) -> None:
        done = []
        for entry in entries:
            entry.refs -= 1
            if entry.refs > 0 or entry.keep or self._entries.get(entry.mount_point) is not entry:
                continue
            del self._entries[entry.mount_point]
            if entry.device is not None:
                done.append(entry)
        await self._release(done)

    async def _release(self, entries: list[_Entry]) -> None:
        """Release newest first (a mount made on top of another goes first); the first
        failure is raised once all were tried."""
        loop = asyncio.get_running_loop()
        for entry in entries:
            self._releasing[entry.mount_point] = loop.create_future()
        first: AgentError | None = None
        for entry in sorted(entries, key=lambda e: e.device.seq, reverse=True):
            try:
                await entry.device.release()
                log.info("storage released", mount_point=entry.mount_point, driver=entry.device.driver)
            except Exception as exc:
                err = exc if isinstance(exc, AgentError) else AgentError(
                    f"release storage at {entry.mount_point}: {exc}")
                log.error("cannot release storage", mount_point=entry.mount_point, error=err.message)
                first = first or err
            finally:
                self._releasing.pop(entry.mount_point).set_result(None)
        if first is not None:
            raise first

    # -- the end --------------------------------------------------------------------------

    async def destroy_all(self) -> list[str]:
        """Release every storage, shared ones included, and the watchable tmpfs.  Never
        raises: DestroySandbox goes on.  Returns the failures' messages."""
        for entry in list(self._entries.values()):
            if not entry.ready.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(entry.ready)
        entries = [e for e in self._entries.values() if e.device is not None]
        self._entries.clear()
        self._owners.clear()
        failures = []
        # The watchable tmpfs goes in creation order too: after the mirrors in it, before
        # the shared directory it sits in.
        items: list[tuple[int, str, object]] = [(e.device.seq, e.mount_point, e.device) for e in entries]
        if self.watch_root.mounted:
            items.append((self.watch_root.seq, self.watch_root.path, self.watch_root))
        for _, mp, item in sorted(items, key=lambda t: t[0], reverse=True):
            try:
                if isinstance(item, WatchRoot):
                    await asyncio.to_thread(item.release_sync)
                else:
                    await item.release()
            except Exception as exc:
                failures.append(f"{mp}: {_message(exc)}")
                log.error("cannot release storage", mount_point=mp, error=_message(exc))
        return failures


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AgentError) else str(exc) or type(exc).__name__
