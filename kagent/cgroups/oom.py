"""OOM notification: a file descriptor per container that an event loop can watch.

    watch = manager.oom_watch()
    loop.add_reader(watch.fileno(), on_ready)   # then in on_ready:
    kills = watch.read()                        # new OOM events since the last read (may be 0)
    if watch.closed_by_kernel: ...              # the cgroup is gone; remove the reader, close

v1: an eventfd registered on memory.oom_control through cgroup.event_control;
the kernel signals it when the cgroup hits OOM (and once more when the cgroup
is removed).  ``read`` counts the new ``oom_kill`` increments, and counts one
event when the counter did not move but the cgroup was under OOM (the OOM
killer disabled).

v2: inotify on memory.events (the kernel notifies on every counter change);
``read`` returns the new ``oom_kill`` increments.  cgroup.events is watched
too, so the fd also wakes when the cgroup empties.

Both are non-blocking and close-on-exec; ``read`` never blocks.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct

from .stats import parse_flat

__all__ = ["OomWatch", "V1OomWatch", "V2OomWatch", "OomEvents"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
IN_MODIFY = 0x2
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


def _read_flat(path: str) -> dict[str, int] | None:
    try:
        with open(path, "rb") as f:
            return parse_flat(f.read())
    except FileNotFoundError:
        return None


class OomWatch:
    """Base: one fd, ``read()`` → new OOM events, ``close()``."""

    def __init__(self, fd: int, directory: str) -> None:
        self._fd = fd
        self.directory = directory
        #: set when the kernel says the cgroup is gone; nothing more will come
        self.closed_by_kernel = False

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("OOM watch is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OomWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self) -> int:
        raise NotImplementedError


class V1OomWatch(OomWatch):
    def __init__(self, directory: str) -> None:
        control = os.path.join(directory, "memory.oom_control")
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # the kernel keeps its own reference to the oom_control file
                with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                    f.write(f"{efd} {cfd}")
            finally:
                os.close(cfd)
        except BaseException:
            os.close(efd)
            raise
        super().__init__(efd, directory)
        self._control = control
        self._seen = (_read_flat(control) or {}).get("oom_kill", 0)

    def read(self) -> int:
        try:
            notified = os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0
        flat = _read_flat(self._control)
        if flat is None:  # the eventfd also fires when the cgroup is removed
            self.closed_by_kernel = True
            return 0
        # The kernel signals when the cgroup enters OOM, before the killer has counted its
        # kill in oom_kill: each notification is an event (as upstream), not the counter.
        kills = flat.get("oom_kill", self._seen)
        self._seen = max(self._seen, kills)
        return max(1, int(notified))


class V2OomWatch(OomWatch):
    def __init__(self, directory: str) -> None:
        events = os.path.join(directory, "memory.events")
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        try:
            self._events_wd = self._watch(fd, events)
            populated = os.path.join(directory, "cgroup.events")
            self._populated_wd = self._watch(fd, populated) if os.path.exists(populated) else -1
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, directory)
        self._events = events
        self._seen = (_read_flat(events) or {}).get("oom_kill", 0)

    @staticmethod
    def _watch(fd: int, path: str) -> int:
        wd = _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch({path!r}): {os.strerror(err)}", path)
        return wd

    def _drain(self) -> bool:
        """Consume queued inotify events; True if the watch on memory.events went away."""
        gone = False
        while True:
            try:
                buf = os.read(self.fileno(), 4096)
            except BlockingIOError:
                return gone
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                if wd == self._events_wd and mask & IN_IGNORED:
                    gone = True
                off += _EVENT.size + length

    def read(self) -> int:
        gone = self._drain()
        flat = _read_flat(self._events)
        if flat is None or gone:
            self.closed_by_kernel = True
            if flat is None:
                return 0
        kills = flat.get("oom_kill", self._seen)
        new = max(0, kills - self._seen)
        self._seen = kills
        return new


class OomEvents:
    """The supervisor's OOM queue for GetOOMEvent: one entry per OOM kill, in order.

    ``watch(container_id, watch)`` hands a container's OomWatch to the running
    loop (``add_reader``); each kill it reports queues the container id once,
    so several containers OOMing together lose nothing.  ``get()`` waits for
    the next id.  A watch whose cgroup went away is dropped and closed.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._watches: dict[str, OomWatch] = {}
        self.kills = 0  # OOM kills seen, for kagent_oom_events_total

    def watch(self, container_id: str, watch: OomWatch) -> None:
        self.unwatch(container_id)
        self._watches[container_id] = watch
        asyncio.get_running_loop().add_reader(watch.fileno(), self._ready, container_id, watch)

    def _ready(self, container_id: str, watch: OomWatch) -> None:
        try:
            kills = watch.read()
        except OSError:
            kills = 0
            watch.closed_by_kernel = True
        self.kills += kills
        for _ in range(kills):
            self._queue.put_nowait(container_id)
        if watch.closed_by_kernel:
            self.unwatch(container_id)

    def unwatch(self, container_id: str) -> None:
        """Stop watching a container (RemoveContainer); events already queued stay."""
        watch = self._watches.pop(container_id, None)
        if watch is not None:
            try:
                asyncio.get_running_loop().remove_reader(watch.fileno())
            except (RuntimeError, ValueError):
                pass
            watch.close()

    async def get(self) -> str:
        """The container id of the next OOM kill (waits for one)."""
        return await self._queue.get()

    def close(self) -> None:
        for cid in list(self._watches):
            self.unwatch(cid)
