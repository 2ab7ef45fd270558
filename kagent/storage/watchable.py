"""watchable-bind: a volume whose changes must reach the container without inotify.

Kubernetes updates configmaps and secrets in place; virtio-fs and 9p do not pass inotify
events to the guest.  So, as upstream's ``watcher.rs``: the source is polled (every 2 s)
and mirrored — new, changed (newer mtime) and removed files, directories and symlinks,
with their modes and owners — into the mount point, which lives on a tmpfs the agent
mounts at ``/run/kata-containers/shared/containers/watchable``.

A source too big to poll cheaply (more than 16 entries, the source directory included,
or more than 1 MiB) stops being watched: the mount point becomes a plain bind mount of
the source, which is up to date by construction but gets no inotify events.

Each storage has its own poll task, cancelled when the storage is released.  A poll runs
in a thread; a lock keeps it and the release from overlapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import threading

from kagent.log import get_logger
from kagent.runtime import syscalls
from kagent.storage.common import (
    Device,
    StorageSpec,
    check_path,
    is_mounted,
    make_dirs,
    remove_created,
    storage_error,
    umount,
)
from kagent.storage.context import Context

log = get_logger("storage")

WATCHABLE_BIND = "watchable-bind"
MAX_ENTRIES = 16
MAX_BYTES = 1024 * 1024


class TooBig(Exception):
    """The source passed a limit: it is bound instead of watched."""


class Mirror:
    """One watched source and its copy."""

    def __init__(self, source: str, target: str, *, mountinfo: str) -> None:
        self.source = source
        self.target = target
        self.mountinfo = mountinfo
        self.watched: dict[str, int] = {}  # source path → mtime_ns when last copied
        self.watching = True
        self.bound = False  # the target is a bind mount of the source (too big to watch)
        self.closed = False
        self.lock = threading.Lock()
        self.source_is_dir = os.path.isdir(source)

    # -- one poll ------------------------------------------------------------------------

    def check(self) -> int:
        """Mirror what changed since the last poll; bind instead when the source got too big."""
        with self.lock:
            if self.closed or not self.watching:
                return 0
            try:
                return self._scan()
            except TooBig as exc:
                log.info("watchable storage too big, binding it instead", source=self.source,
                         mount_point=self.target, reason=str(exc))
                self._bind_instead()
                return 0

    def _scan(self) -> int:
        for path in [p for p in self.watched if not os.path.lexists(p)]:
            del self.watched[path]
            self._remove_copy(self._dest(path))
        updates: list[str] = []
        self._walk(updates)
        for path in updates:
            try:
                self._copy(path)
            except OSError as exc:
                log.error("cannot mirror a watched file", path=path, error=str(exc))
        return len(updates)

    def _walk(self, updates: list[str]) -> None:
        total = 0
        stack = [self.source]
        while stack:
            path = stack.pop()
            st = os.lstat(path)
            old = self.watched.get(path)
            self.watched[path] = st.st_mtime_ns
            if stat.S_ISDIR(st.st_mode):
                if old is None:
                    updates.append(path)
                stack.extend(os.path.join(path, n) for n in sorted(os.listdir(path), reverse=True))
            else:
                total += st.st_size
                if old is None or st.st_mtime_ns > old:
                    updates.append(path)
            if len(self.watched) > MAX_ENTRIES:
                raise TooBig(f"more than {MAX_ENTRIES} entries")
            if total > MAX_BYTES:
                raise TooBig(f"more than {MAX_BYTES} bytes")

    def _dest(self, path: str) -> str:
        if not self.source_is_dir:
            return self.target
        rel = os.path.relpath(path, self.source)
        return self.target if rel == "." else os.path.join(self.target, rel)

    def _copy(self, path: str) -> None:
        st = os.lstat(path)
        dest = self._dest(path)
        if stat.S_ISDIR(st.st_mode):
            os.makedirs(dest, exist_ok=True)
            os.chmod(dest, stat.S_IMODE(st.st_mode))
            os.chown(dest, st.st_uid, st.st_gid)
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if stat.S_ISLNK(st.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
            os.symlink(os.readlink(path), dest)
            os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            # copy beside, then rename: a reader never sees half a file
            tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.kagent-tmp")
            shutil.copyfile(path, tmp, follow_symlinks=False)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, dest)
        else:
            log.warning("not mirroring a special file", path=path)  # a fifo would block a copy

    @staticmethod
    def _remove_copy(dest: str) -> None:
        try:
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest)
            else:
                os.unlink(dest)
        except OSError:
            pass  # gone with its removed parent

    def _bind_instead(self) -> None:
        try:
            if not os.path.lexists(self.target):
                if self.source_is_dir:
                    os.makedirs(self.target)
                else:
                    os.makedirs(os.path.dirname(self.target), exist_ok=True)
                    open(self.target, "a").close()
            syscalls.mount(self.source, self.target, None, syscalls.MS_BIND)
        except OSError as exc:
            log.error("cannot bind the watchable storage, still watching it", source=self.source,
                      mount_point=self.target, error=str(exc))
            return
        self.bound = True
        self.watching = False

    # -- release ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop for good: umount the bind if any, remove the copy."""
        with self.lock:
            self.closed = True
            self.watching = False
            if self.bound:
                umount(self.target, "umount watchable-bind storage")
                self.bound = False
            if is_mounted(self.target, mountinfo_path=self.mountinfo):
                return  # never delete through a mount: that would delete the source
            self._remove_copy(self.target)


class WatchRoot:
    """The tmpfs under which watchable mirrors live (the shared directory is read-only)."""

    def __init__(self, path: str, mountinfo: str) -> None:
        self.path = path
        self.mountinfo = mountinfo
        self.mounted = False
        self.created: list[str] = []
        self.seq = 0
        self._lock = asyncio.Lock()

    async def ensure(self, ctx: Context) -> None:
        async with self._lock:
            if self.mounted or await asyncio.to_thread(is_mounted, self.path, None, self.mountinfo):
                return
            await asyncio.to_thread(self._mount)
            self.seq = ctx.next_seq()

    def _mount(self) -> None:
        try:
            self.created = make_dirs(self.path)
            syscalls.mount("tmpfs", self.path, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=755")
        except OSError as exc:
            remove_created(self.created)
            self.created = []
            raise storage_error(exc, f"mount the watchable-bind tmpfs at {self.path}") from None
        self.mounted = True
        log.info("watchable-bind tmpfs mounted", path=self.path)

    def release_sync(self) -> None:
        if self.mounted:
            umount(self.path, "umount the watchable-bind tmpfs")
            self.mounted = False
        remove_created(self.created)
        self.created = []


class WatchedDevice(Device):
    mirror: Mirror
    task: asyncio.Task | None = None

    async def release(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self.mirror.close()
        remove_created(self.created)
        self.created = []


async def _poll(mirror: Mirror, interval: float) -> None:
    while mirror.watching:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(mirror.check)
        except Exception as exc:  # a bad poll must not end the watch
            log.warning("watchable storage poll failed", source=mirror.source, error=str(exc))


class BindWatcherHandler:
    drivers = (WATCHABLE_BIND,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        source = check_path(spec.source, "watchable-bind source")
        if ctx.watch_root is not None:
            await ctx.watch_root.ensure(ctx)
        dev = WatchedDevice(WATCHABLE_BIND, spec.mount_point)
        dev.mirror = Mirror(source, spec.mount_point, mountinfo=ctx.paths.mountinfo)

        def first_copy() -> None:
            try:
                parent = spec.mount_point if dev.mirror.source_is_dir else os.path.dirname(spec.mount_point)
                dev.created = make_dirs(parent)
            except OSError as exc:
                raise storage_error(exc, f"watchable-bind storage {spec.mount_point}") from None
            try:
                dev.mirror.check()
            except OSError as exc:
                dev._close()
                raise storage_error(exc, f"watchable-bind storage {spec.mount_point}: copy {source}") from None

        if not os.path.lexists(source):
            raise storage_error(FileNotFoundError(2, "No such file or directory", source),
                                f"watchable-bind storage {spec.mount_point}: source")
        await asyncio.to_thread(first_copy)
        if dev.mirror.watching:
            dev.task = asyncio.get_running_loop().create_task(
                _poll(dev.mirror, ctx.watch_interval), name=f"watch {spec.mount_point}")
        return dev
