"""The devices the kernel announced, and the coroutines waiting for one.

Everything here runs on the event loop thread: the listener calls ``handle`` from its
reader callback and a handler calls ``wait_for`` from a coroutine.  "Look through what
was seen, else register a waiter" has no ``await`` in it, so no event can slip in
between — the same guarantee upstream gets by holding the sandbox lock across both.

- ``add``: memory blocks (``/devices/system/memory/memoryN``) are onlined by writing
  "1" to ``<sysfs>/devices/system/memory/memoryN/online`` and not recorded; CPUs are
  recorded in ``added_cpus`` (for OnlineCPUMem) and, like every other add, stored by
  devpath; waiters whose matcher accepts the event are woken.
- ``remove``: the entry is forgotten.
- anything else (change, bind, move, ...) is ignored, as upstream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from kagent.devices.uevent_defs import ACTION_ADD, ACTION_REMOVE, Uevent
from kagent.errors import DeadlineExceeded
from kagent.log import get_logger

log = get_logger("uevent")

Matcher = Callable[[Uevent], bool]

DEFAULT_HOTPLUG_TIMEOUT = 3.0
#: a bound on the devices remembered; each add of a device that is never removed costs one
#: entry, and the oldest go first (a guest has a few hundred devpaths, queues included)
MAX_DEVICES = 65536

_MEMORY_BLOCK = re.compile(r"/devices/system/memory/memory[0-9]+")
_CPU = re.compile(r"/devices/system/cpu/cpu([0-9]+)")


def format_timeout(seconds: float) -> str:
    """3.0 → "3s", 0.5 → "500ms", 90 → "1m30s" (as the option is written)."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1 and secs == 0:
        return f"{minutes:g}m"
    if minutes >= 1:
        return f"{minutes:g}m{secs:g}s"
    return f"{seconds:g}s"


class _Waiter:
    __slots__ = ("matcher", "future", "what")

    def __init__(self, matcher: Matcher, future: asyncio.Future[Uevent], what: str) -> None:
        self.matcher = matcher
        self.future = future
        self.what = what


class DeviceRegistry:
    """Devices seen since the listener started (by devpath), and the waiters for more."""

    def __init__(self, *, sysfs_root: str = "/sys",
                 hotplug_timeout: float = DEFAULT_HOTPLUG_TIMEOUT,
                 max_devices: int = MAX_DEVICES) -> None:
        self.sysfs_root = sysfs_root
        self.hotplug_timeout = hotplug_timeout
        self.max_devices = max_devices
        self.devices: dict[str, Uevent] = {}
        #: CPU numbers from CPU add events, in arrival order; see take_added_cpus()
        self.added_cpus: list[int] = []
        self.onlined_memory: int = 0  # memory blocks onlined (for logs and tests)
        self.online_failures: int = 0
        self._waiters: list[_Waiter] = []
        self.events_by_action: dict[str, int] = {}  # for kagent_uevents_total

    # --- the listener's side ----------------------------------------------------------------

    def handle(self, uev: Uevent) -> None:
        """Take one event (on the loop thread).  Never raises."""
        self.events_by_action[uev.action] = self.events_by_action.get(uev.action, 0) + 1
        if uev.action == ACTION_ADD:
            self._add(uev)
        elif uev.action == ACTION_REMOVE:
            self.devices.pop(uev.devpath, None)

    def _add(self, uev: Uevent) -> None:
        if _MEMORY_BLOCK.fullmatch(uev.devpath):
            self._online_memory(uev.devpath)
            return
        cpu = _CPU.fullmatch(uev.devpath)
        if cpu and uev.subsystem == "cpu":
            self.added_cpus.append(int(cpu.group(1)))
        devices = self.devices
        devices.pop(uev.devpath, None)  # a re-added device moves to the newest end
        devices[uev.devpath] = uev
        if len(devices) > self.max_devices:
            del devices[next(iter(devices))]
        if self._waiters:
            self._wake(uev)

    def _wake(self, uev: Uevent) -> None:
        keep = []
        for w in self._waiters:
            if w.future.done():  # cancelled or timed out: wait_for removes it too
                continue
            if self._matches(w, uev):
                w.future.set_result(uev)
            else:
                keep.append(w)
        self._waiters = keep

    @staticmethod
    def _matches(w: _Waiter, uev: Uevent) -> bool:
        try:
            return bool(w.matcher(uev))
        except Exception:  # a broken matcher must not take the listener down
            log.exception("uevent matcher failed", waiting_for=w.what, devpath=uev.devpath)
            return False

    def _online_memory(self, devpath: str) -> None:
        path = f"{self.sysfs_root}{devpath}/online"
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            self.online_failures += 1
            log.error("failed to online memory block", device=devpath, error=str(exc))
            return
        self.onlined_memory += 1
        log.info("onlined memory block", device=devpath)

    # --- the handlers' side -----------------------------------------------------------------

    def find(self, matcher: Matcher) -> Uevent | None:
        """The newest recorded device the matcher accepts, if any."""
        for uev in reversed(self.devices.values()):
            if matcher(uev):
                return uev
        return None

    async def wait_for(self, matcher: Matcher, timeout: float | None = None,
                       what: str = "device") -> Uevent:
        """The first add event ``matcher`` accepts: one already seen, or the next to come.

        ``timeout`` defaults to the hotplug timeout; ``what`` names the device in the
        DeadlineExceeded message ("timeout after 3s waiting for <what>").
        """
        found = self.find(matcher)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        waiter = _Waiter(matcher, loop.create_future(), what)
        self._waiters.append(waiter)
        limit = self.hotplug_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await waiter.future
        except TimeoutError:
            raise DeadlineExceeded(
                f"timeout after {format_timeout(limit)} waiting for {what}"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    @property
    def waiting(self) -> list[str]:
        """What the pending waiters wait for (for logs and tests)."""
        return [w.what for w in self._waiters if not w.future.done()]

    def take_added_cpus(self) -> list[int]:
        """The CPUs added since the last call (OnlineCPUMem onlines them), oldest first."""
        cpus, self.added_cpus = self.added_cpus, []
        return cpus
