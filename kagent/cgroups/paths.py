"""Where cgroups live: the mounted hierarchies (``Layout``) and container cgroup paths.

``detect`` and ``Layout.discover`` read /proc/self/mountinfo: v1 hierarchies
are found by their controller super-options (cpu and cpuacct may be separate
mounts or one), the v2 hierarchy by fstype ``cgroup2``.  The driver follows
what is mounted: one cgroup2 at the top → "v2"; v1 hierarchies (with or
without a cgroup2 beside them, as systemd's hybrid layout has) → the v1
driver.

``container_path`` maps an OCI ``linux.cgroupsPath`` to a path relative to each
hierarchy's root, always *inside* the agent's own parent cgroup:
``/kubepods/pod1/c1`` and ``kubepods/pod1/c1`` both give ``<parent>/kubepods/pod1/c1``,
``..`` cannot climb out, and a systemd-style ``slice:prefix:name`` becomes the
plain path systemd would use (``a-b.slice`` → ``a.slice/a-b.slice``,
unit ``prefix-name.scope``).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field

from kagent import errors
from kagent.runtime import mountinfo

__all__ = ["V1_CONTROLLERS", "Layout", "detect", "container_path", "systemd_path"]

#: v1 controllers the agent manages (and mounts in init mode), as upstream
V1_CONTROLLERS = (
    "cpu", "cpuacct", "blkio", "cpuset", "memory", "devices", "freezer",
    "net_cls", "perf_event", "net_prio", "hugetlb", "pids", "rdma",
)
DEFAULT_SLICE = "system.slice"
_SYSTEMD_PATH = re.compile(r"^[\w\-.]*:[\w\-.]*:[\w\-.]*$")


def _as_mounts(mounts: list[mountinfo.Mount] | str | None) -> list[mountinfo.Mount]:
    if mounts is None:
        return mountinfo.read()
    if isinstance(mounts, str):
        return mountinfo.parse(mounts)
    return mounts


@dataclass(frozen=True)
class Layout:
    """The mounted cgroup hierarchies.

    ``v1`` maps each v1 controller to the directory of its hierarchy's root as
    mounted here; ``unified`` is the cgroup2 mount point, if any.
    """

    mode: str  # "v1", "v2" or "hybrid"
    v1: dict[str, str] = field(default_factory=dict)
    unified: str | None = None

    @classmethod
    def discover(cls, mounts: list[mountinfo.Mount] | str | None = None) -> Layout:
        """The layout from mountinfo (this process's when None; text or parsed mounts)."""
        v1: dict[str, str] = {}
        unified = None
        for m in _as_mounts(mounts):
            if m.fstype == "cgroup":
                for opt in m.super_options.split(","):
                    if opt in V1_CONTROLLERS:
                        v1.setdefault(opt, m.mount_point)
            elif m.fstype == "cgroup2" and unified is None:
                unified = m.mount_point
        if v1:
            return cls("hybrid" if unified else "v1", v1, unified)
        if unified:
            return cls("v2", {}, unified)
        raise errors.FailedPrecondition("no cgroup hierarchy is mounted (no cgroup or cgroup2 in mountinfo)")

    @property
    def driver(self) -> str:
        """The manager that serves this layout: "v1" (v1 and hybrid) or "v2"."""
        return "v2" if self.mode == "v2" else "v1"

    def v1_dirs(self, rel: str) -> dict[str, str]:
        """controller → the directory of ``rel`` in that controller's hierarchy."""
        return {c: os.path.join(root, rel) for c, root in self.v1.items()}


def detect(mounts: list[mountinfo.Mount] | str | None = None) -> str:
    """"v1", "v2" or "hybrid", from mountinfo (text, parsed, or this process's)."""
    return Layout.discover(mounts).mode


def _check_name(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise errors.InvalidArgument(f"invalid {what} {name!r}")
    return name


def systemd_path(cgroups_path: str) -> str:
    """``slice:prefix:name`` → the plain path systemd uses for that unit."""
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise errors.InvalidArgument(f"invalid systemd cgroupsPath {cgroups_path!r} (want slice:prefix:name)")
    slice_, prefix, name = parts
    slice_ = slice_ or DEFAULT_SLICE
    if not slice_.endswith(".slice") or "/" in slice_:
        raise errors.InvalidArgument(f"invalid slice name {slice_!r} in cgroupsPath {cgroups_path!r}")
    dirs: list[str] = []
    if slice_ != "-.slice":  # "-.slice" is the root slice
        stem = ""
        for sub in slice_[: -len(".slice")].split("-"):
            if not sub:
                raise errors.InvalidArgument(f"invalid slice name {slice_!r} in cgroupsPath {cgroups_path!r}")
            stem = f"{stem}-{sub}" if stem else sub
            dirs.append(f"{stem}.slice")
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    dirs.append(_check_name(unit, "systemd unit name"))
    return "/".join(dirs)


def is_systemd_path(cgroups_path: str) -> bool:
    return bool(_SYSTEMD_PATH.match(cgroups_path))


def container_path(cgroups_path: str, parent: str, default_name: str = "") -> str:
    """The cgroup of a container, relative to each hierarchy root, under ``parent``.

    An empty cgroupsPath gives ``<parent>/<default_name>``.  The result never
    leaves ``parent``: ``..`` is resolved against the parent, never above it.
    """
    parent_rel = posixpath.normpath("/" + (parent or "")).lstrip("/")
    if not parent_rel:
        raise errors.InvalidArgument("the agent's cgroup parent must not be the hierarchy root")
    if "\0" in cgroups_path:
        raise errors.InvalidArgument("cgroupsPath contains a NUL byte")
    if not cgroups_path:
        rel = _check_name(default_name, "container id")
    elif is_systemd_path(cgroups_path) and ":" in cgroups_path:
        rel = systemd_path(cgroups_path)
    else:
        # normpath of an absolute path drops every ".." that would climb above "/"
        rel = posixpath.normpath("/" + cgroups_path).lstrip("/")
        if not rel:
            rel = _check_name(default_name, "container id")
    return f"{parent_rel}/{rel}"


def parent_of(rel: str) -> str:
    return posixpath.dirname(rel)


def ancestors(rel: str, top: str) -> list[str]:
    """The paths from ``top`` down to ``rel``'s parent (both relative), top first."""
    top = top.strip("/")
    parts = rel.strip("/").split("/")
    depth = len(top.split("/")) if top else 0
    if top and "/".join(parts[:depth]) != top:
        raise errors.InvalidArgument(f"cgroup {rel!r} is not under {top!r}")
    return ["/".join(parts[:i]) for i in range(max(depth, 1), len(parts))]
