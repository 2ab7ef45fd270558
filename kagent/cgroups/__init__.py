"""Cgroups v1 and v2 behind one interface: resources, stats, freezer, OOM, cpuset, mounting.

    from kagent import cgroups
    m = cgroups.new_manager(config.cgroup_parent)      # v1 (and hybrid) or v2, as mounted
    m.create(spec["linux"].get("cgroupsPath", ""), spec["linux"].get("resources"), container_id=cid)
    m.apply(pid)

See manager.py for the whole interface, paths.py for where cgroups go,
oom.py for the OOM fd, mount.py for init mode.
"""

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
