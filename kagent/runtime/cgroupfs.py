"""A ``cgroup`` mount in the container: the container's own cgroups at /sys/fs/cgroup.

With a cgroup namespace the hierarchies are mounted afresh (the kernel roots
them at the container's cgroup).  Without one, the container's cgroup
directories are bind-mounted from the host's hierarchies.  cgroup v2 gets one
mount; v1 and hybrid layouts get a tmpfs with one directory per hierarchy, as
runc does.  The mount is best effort: failing it warns and the container goes
on without it (upstream agents behave the same on odd hosts).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import mountinfo, syscalls
from .syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

Warn = Callable[[str], None]
_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _own_cgroups() -> dict[str, str]:
    """controller list (as in /proc/self/cgroup) → this process's cgroup path; "" is v2."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[controllers] = path
    return out


def _hierarchies() -> list[mountinfo.Mount]:
    seen, out = set(), []
    for m in mountinfo.read():
        if m.fstype in ("cgroup", "cgroup2") and m.mount_point.startswith("/sys/fs/cgroup"):
            key = (m.fstype, m.super_options if m.fstype == "cgroup" else "")
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out


def _v1_controllers(m: mountinfo.Mount) -> str:
    known = (
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "net_prio",
        "blkio",
        "perf_event",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
    )
    opts = m.super_options.split(",")
    names = [o for o in opts if o in known] + [o for o in opts if o.startswith("name=")]
    return ",".join(names)


def mount(dest: str, flags: int, warn: Warn, *, in_cgroupns: bool) -> None:
    try:
        _mount(dest, flags, in_cgroupns)
    except OSError as exc:
        warn(f"cgroup mount at {dest} skipped: {exc}")


def _mount(dest: str, flags: int, in_cgroupns: bool) -> None:
    os.makedirs(dest, mode=0o755, exist_ok=True)
    ro = flags & MS_RDONLY
    hierarchies = _hierarchies()
    own = _own_cgroups()
    if (
        len(hierarchies) == 1
        and hierarchies[0].fstype == "cgroup2"
        and hierarchies[0].mount_point == "/sys/fs/cgroup"
    ):
        _one(hierarchies[0], dest, own, ro, in_cgroupns)
        return
    syscalls.mount("tmpfs", dest, "tmpfs", _FLAGS, "mode=755")
    for h in hierarchies:
        name = os.path.basename(h.mount_point)
        if h.mount_point == "/sys/fs/cgroup" or not name:
            continue
        sub = os.path.join(dest, name)
        os.makedirs(sub, mode=0o755, exist_ok=True)
        _one(h, sub, own, ro, in_cgroupns)
        if "," in name:  # co-mounted controllers: "cpu,cpuacct" gets cpu and cpuacct links
            for part in name.split(","):
                if not os.path.lexists(os.path.join(dest, part)):
                    os.symlink(name, os.path.join(dest, part))
    if ro:
        syscalls.mount(None, dest, None, MS_REMOUNT | MS_RDONLY | _FLAGS, "mode=755")


def _one(h: mountinfo.Mount, dest: str, own: dict[str, str], ro: int, in_cgroupns: bool) -> None:
    if h.fstype == "cgroup2":
        path = own.get("", "/")
        data = None
    else:
        controllers = _v1_controllers(h)
        path = next(
            (p for c, p in own.items() if c and set(c.split(",")) == set(controllers.split(","))),
            "/",
        )
        data = controllers
    if in_cgroupns:
        syscalls.mount("cgroup", dest, h.fstype, _FLAGS | ro, data)
        return
    # No cgroup namespace: show only the container's own cgroup, bound from the host.
    host = os.path.join(h.mount_point, os.path.relpath(path, h.root if h.root != "/" else "/"))
    syscalls.mount(host, dest, None, MS_BIND | MS_REC)
    syscalls.mount(None, dest, None, MS_BIND | MS_REMOUNT | _FLAGS | ro)
