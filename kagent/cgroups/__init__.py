"""Cgroups v1 and v2 behind one interface: resources, stats, freezer, OOM, cpuset, mounting.

    from kagent import cgroups
    m = cgroups.new_manager(config.cgroup_parent)      # v1 (and hybrid) or v2, as mounted
    m.create(spec["linux"].get("cgroupsPath", ""), spec["linux"].get("resources"), container_id=cid)
    m.enter()                                          # in the forked init (or m.apply(pid))

See manager.py for the whole interface, paths.py for where cgroups go,
oom.py for the OOM fd, mount.py for init mode.

Each name below is loaded with its submodule when first used: the supervisor needs only
OomEvents to start, and loading every submodule would add milliseconds to its start-up.
(The zygote preloads what container workers use, see kagent.zygote.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {  # name → the submodule that defines it
    "guest_cpus": "hotplug",
    "online_cpus": "hotplug",
    "online_memory": "hotplug",
    "DESTROY_TIMEOUT": "manager",
    "FREEZE_TIMEOUT": "manager",
    "Manager": "manager",
    "new_manager": "manager",
    "update_cpuset_path": "manager",
    "widen_agent_cpuset": "manager",
    "mount_cgroups": "mount",
    "OomEvents": "oom",
    "OomWatch": "oom",
    "Layout": "paths",
    "container_path": "paths",
    "detect": "paths",
    "to_proto": "stats",
}

if TYPE_CHECKING:
    from .hotplug import guest_cpus, online_cpus, online_memory
    from .manager import (
        DESTROY_TIMEOUT,
        FREEZE_TIMEOUT,
        Manager,
        new_manager,
        update_cpuset_path,
        widen_agent_cpuset,
    )
    from .mount import mount_cgroups
    from .oom import OomEvents, OomWatch
    from .paths import Layout, container_path, detect
    from .stats import to_proto

__all__ = [
    "DESTROY_TIMEOUT",
    "FREEZE_TIMEOUT",
    "Layout",
    "Manager",
    "OomEvents",
    "OomWatch",
    "container_path",
    "detect",
    "guest_cpus",
    "mount_cgroups",
    "new_manager",
    "online_cpus",
    "online_memory",
    "to_proto",
    "update_cpuset_path",
    "widen_agent_cpuset",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # from now on an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
