"""Mounting the cgroup hierarchies when the agent is the guest's init (upstream mount.rs).

v2 (``agent.unified_cgroup_hierarchy``): one ``cgroup2`` at ``root`` with
nsdelegate and favordynmods (without it a process moved into a cgroup, as each
container's init is, can wait an RCU grace period for the kernel's threadgroup
lock; a kernel older than 6.0 refuses the option and gets nsdelegate alone),
then every offered controller is enabled in the root's
cgroup.subtree_control (the manager enables them further down as it creates
cgroups).

v1: a tmpfs at ``root``; one ``cgroup`` mount per enabled controller listed in
/proc/cgroups (each its own hierarchy, cpu and cpuacct apart); without a
``devices`` controller nothing is mounted at all (a warning), as upstream;
then the tmpfs is remounted read-only and memory.use_hierarchy is set to 1.

``plan`` is the pure part (what to mount, from /proc/cgroups' text) and
``mount_cgroups`` does it; the init issue calls ``mount_cgroups``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from kagent.log import get_logger
from kagent.runtime import syscalls
from kagent.runtime.syscalls import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
)

from . import fswrite
from .paths import V1_CONTROLLERS

__all__ = ["MountStep", "plan", "parse_proc_cgroups", "mount_cgroups"]

log = get_logger("cgroups")

_BASE = MS_NOSUID | MS_NODEV | MS_NOEXEC


@dataclass(frozen=True)
class MountStep:
    source: str
    target: str
    fstype: str
    flags: int
    data: str


def parse_proc_cgroups(text: str) -> list[str]:
    """The enabled, known controllers of /proc/cgroups, in file order.

    Skipped as upstream: comment lines, lines with fewer than 4 fields,
    non-numeric fields, ``enabled == 0`` and names the agent does not manage.
    """
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 4:
            continue
        name = fields[0].strip()
        try:
            enabled = int(fields[3])
            int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if enabled and name in V1_CONTROLLERS and name not in out:
            out.append(name)
    return out


def plan(unified: bool, root: str, proc_cgroups: str) -> list[MountStep]:
    """The mounts for the v2 or v1 layout; empty when v1 has no devices controller."""
    if unified:
        return [MountStep("cgroup2", root, "cgroup2", _BASE | MS_RELATIME, "nsdelegate,favordynmods")]
    controllers = parse_proc_cgroups(proc_cgroups)
    if "devices" not in controllers:
        return []
    steps = [MountStep("tmpfs", root, "tmpfs", _BASE, "mode=755")]
    steps += [MountStep("cgroup", os.path.join(root, c), "cgroup", _BASE | MS_RELATIME, c) for c in controllers]
    return steps


def mount_cgroups(unified: bool, root: str = "/sys/fs/cgroup", proc_cgroups: str = "/proc/cgroups") -> list[str]:
    """Mount the hierarchies (see the module doc); returns the mount points made."""
    text = ""
    if not unified:
        with open(proc_cgroups) as f:
            text = f.read()
    steps = plan(unified, root, text)
    if not steps:
        log.warning("no devices cgroup controller in /proc/cgroups: cgroups are not mounted", file=proc_cgroups)
        return []
    os.makedirs(root, mode=0o755, exist_ok=True)
    done = []
    for step in steps:
        if step.target != root:
            os.makedirs(step.target, mode=0o755, exist_ok=True)
        try:
            syscalls.mount(step.source, step.target, step.fstype, step.flags, step.data)
        except OSError as exc:
            if not (exc.errno == errno.EINVAL and step.fstype == "cgroup2"):
                raise
            log.info("cgroup2 mounted without favordynmods (the kernel does not know it)")
            syscalls.mount(step.source, step.target, step.fstype, step.flags, "nsdelegate")
        done.append(step.target)
    if unified:
        _enable_root_controllers(root)
    else:
        # the controller directories exist now; nothing else may appear in the tmpfs
        syscalls.mount(None, root, None, MS_REMOUNT | MS_RDONLY | _BASE, "mode=755")
        use_hierarchy = os.path.join(root, "memory", "memory.use_hierarchy")
        if os.path.exists(use_hierarchy):
            fswrite.write_batch([(use_hierarchy, "1")])
    log.info("cgroups mounted", version="v2" if unified else "v1", mounts=len(done))
    return done


def _enable_root_controllers(root: str) -> None:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            offered = f.read().split()
    except FileNotFoundError:
        return
    for name in offered:
        try:
            fswrite.write_batch([(os.path.join(root, "cgroup.subtree_control"), f"+{name}")])
        except OSError as exc:
            log.warning("cannot enable cgroup controller", controller=name, error=str(exc))
