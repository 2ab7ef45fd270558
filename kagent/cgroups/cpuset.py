"""cpusets: CPU list syntax, parent initialisation, and the hot-plug rule.

v1 cpusets start empty (``cgroup.clone_children`` is 0), and a task cannot
join a cpuset without cpus and mems (ENOSPC), so every directory the agent
creates is filled from its parent, top down.  A child's cpus must stay within
its parent's: when CPUs are hot-plugged, ``update_cpuset_path`` widens every
ancestor from the agent's parent cgroup downwards before it writes the
container's own list, so a container pinned to a new CPU can run there.
"""

from __future__ import annotations

import os

from kagent import errors
from kagent.log import get_logger

from . import fswrite
from .paths import ancestors

__all__ = ["parse_list", "format_list", "init_from_parent", "update_cpuset_path"]

log = get_logger("cgroups")


def parse_list(text: str) -> set[int]:
    """"0-3,5,7-8" → {0, 1, 2, 3, 5, 7, 8}; empty → empty."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise errors.InvalidArgument(f"invalid cpu/mem list {text!r}") from None
        if first < 0 or last < first:
            raise errors.InvalidArgument(f"invalid cpu/mem list {text!r}")
        out.update(range(first, last + 1))
    return out


def format_list(items: set[int] | list[int]) -> str:
    """The kernel's compact form: {0, 1, 2, 5} → "0-2,5"."""
    ordered = sorted(set(items))
    ranges: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def init_from_parent(directory: str) -> None:
    """Fill an empty cpuset.cpus/cpuset.mems from the parent (v1 needs both before tasks)."""
    parent = os.path.dirname(directory)
    writes = []
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not _read(os.path.join(directory, name)):
            value = _read(os.path.join(parent, name))
            if value:
                writes.append((os.path.join(directory, name), value))
    if writes:
        fswrite.write_batch(writes)


def update_cpuset_path(root: str, top: str, container_rel: str, guest_cpus: str, container_cpus: str) -> None:
    """Write ``guest_cpus`` into cpuset.cpus of every cgroup from ``top`` (the agent's
    parent cgroup, relative to the hierarchy ``root``) down to the container's
    parent, then ``container_cpus`` into the container's own cgroup.

    Nothing is written when ``guest_cpus`` is empty; the container's own list
    is skipped when ``container_cpus`` is empty (upstream only updates
    containers whose spec pins CPUs).
    """
    if not guest_cpus:
        return
    parse_list(guest_cpus)
    writes = [(os.path.join(root, rel, "cpuset.cpus"), guest_cpus) for rel in ancestors(container_rel, top)]
    if container_cpus:
        parse_list(container_cpus)
        writes.append((os.path.join(root, container_rel, "cpuset.cpus"), container_cpus))
    log.info("cpuset update", guest_cpus=guest_cpus, container_cpus=container_cpus, cgroup=container_rel)
    fswrite.write_batch(writes)


def widen_tree(root: str, top: str, guest_cpus: str) -> None:
    """After CPU hot-plug: ``guest_cpus`` into the agent's parent cgroup (``top``) and every
    cgroup below it that has children (pod cgroups), parents first.  v1 only lets a cgroup
    use CPUs its parent has, so without this a container created after the hot-plug could
    not be pinned to the new CPU.  Leaves (containers) keep their own lists."""
    if not guest_cpus:
        return
    parse_list(guest_cpus)
    base = os.path.join(root, top)
    writes = []
    for dirpath, dirnames, _files in os.walk(base):  # top-down: parents are written first
        if dirpath == base or dirnames:
            writes.append((os.path.join(dirpath, "cpuset.cpus"), guest_cpus))
    if writes:
        log.info("cpuset widened for hot-plugged CPUs", guest_cpus=guest_cpus, cgroups=len(writes))
        fswrite.write_batch(writes)
