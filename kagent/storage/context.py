"""What a driver may use besides its request: who asks, where things go, the device layer.

The paths are parameters (defaults are the guest's) so that tests run on temporary trees
and a fake sysfs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kagent.errors import FailedPrecondition

if TYPE_CHECKING:
    from kagent.devices.registry import DeviceRegistry
    from kagent.storage.watchable import WatchRoot

RUN_DIR = "/run/kata-containers"
WATCH_ROOT = "/run/kata-containers/shared/containers/watchable"
SYSFS = "/sys"
DEV = "/dev"
#: upstream's poll period for watchable-bind storages
WATCH_INTERVAL = 2.0
#: the owner of the storages CreateSandbox asks for (container ids cannot be empty)
SANDBOX_OWNER = ""


@dataclass(frozen=True)
class Paths:
    run_dir: str = RUN_DIR  # overlay-rw upper/work go to <run_dir>/<cid>/{upper,work}
    watch_root: str = WATCH_ROOT  # the tmpfs that watchable-bind mirrors live in
    sysfs_root: str = SYSFS  # hugepages: <sysfs>/kernel/mm/hugepages/...
    dev_root: str = DEV  # where hot-plugged disks' nodes are
    mountinfo: str = "/proc/self/mountinfo"


@dataclass
class Context:
    owner: str  # a container id, or SANDBOX_OWNER
    paths: Paths
    devices: DeviceRegistry | None = None
    hotplug_timeout: float | None = None  # None: the registry's
    watch_interval: float = WATCH_INTERVAL
    watch_root: WatchRoot | None = None
    next_seq: Callable[[], int] = field(default=lambda: 0)

    @property
    def container_id(self) -> str | None:
        return self.owner if self.owner != SANDBOX_OWNER else None

    def registry(self, driver: str) -> DeviceRegistry:
        if self.devices is None:
            raise FailedPrecondition(f"{driver} storage: no device layer to wait for the device with")
        return self.devices
