"""Patching an OCI spec (a dict, JSON shape) for devices as the guest sees them.

The host runtime writes ``linux.devices`` with the host's major/minor numbers; inside the
VM the same disk has other numbers.  Once a handler has found the guest's device node,
its numbers (from a stat of the node) replace the host's in the ``linux.devices`` entry
at the container path, in any ``linux.resources.devices`` rule that named the host's
numbers, and an allow rule ``{allow: true, type, major, minor, access: "rwm"}`` is
appended so the container's device cgroup lets it through.

Several devices are patched in one pass (``apply_updates``), as upstream does: when two
devices swap numbers between host and guest, patching one at a time would rewrite the
first device's new rule again for the second.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from kagent.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class DeviceUpdate:
    container_path: str  # the linux.devices entry to patch
    type: str  # "b" or "c", from the node
    major: int
    minor: int
    final_path: str | None = None  # a new path in the container (VFIO: /dev/vfio/<guest group>)


def device_update(container_path: str, node_path: str, final_path: str | None = None) -> DeviceUpdate:
    """Stat the guest's device node ``node_path`` (following links, as the kernel's node)."""
    try:
        st = os.stat(node_path)
    except OSError as exc:
        raise FailedPrecondition(f"device node {node_path} is not there: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        kind = "b"
    elif stat.S_ISCHR(st.st_mode):
        kind = "c"
    else:
        raise FailedPrecondition(f"{node_path} is not a device node")
    return DeviceUpdate(container_path, kind, os.major(st.st_rdev), os.minor(st.st_rdev), final_path)


def update_spec_devices(spec: dict, container_path: str, node_path: str,
                        final_path: str | None = None) -> DeviceUpdate:
    """Patch ``spec`` for one device: see the module docstring.  Returns what was applied."""
    update = device_update(container_path, node_path, final_path)
    apply_updates(spec, [update])
    return update


def _section(parent: dict, key: str, what: str) -> dict:
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"spec {what} is not an object")
    return value


def _list(parent: dict, key: str, what: str) -> list:
    value = parent.get(key)
    if value is None:
        value = parent[key] = []
    if not isinstance(value, list):
        raise InvalidArgument(f"spec {what} is not a list")
    return value


def apply_updates(spec: dict, updates: Iterable[DeviceUpdate]) -> None:
    """Patch ``spec`` for several devices at once; InvalidArgument if one is not in it."""
    pending: dict[str, DeviceUpdate] = {}
    for u in updates:
        if u.container_path in pending:
            raise InvalidArgument(f"conflicting device updates for {u.container_path}")
        pending[u.container_path] = u
    if not pending:
        return
    if not isinstance(spec.get("linux"), dict):
        raise InvalidArgument("spec has no linux section for devices")
    linux = spec["linux"]

    # (spec type, host major, host minor) → the update, to rewrite the rules naming them.
    by_host: dict[tuple[object, object, object], DeviceUpdate] = {}
    for dev in _list(linux, "devices", "linux.devices"):
        path = dev.get("path") if isinstance(dev, dict) else None
        found = pending.pop(path, None) if isinstance(path, str) else None
        if found is None:
            continue
        key = (dev.get("type", ""), dev.get("major"), dev.get("minor"))
        if key in by_host:
            raise InvalidArgument(
                f"conflicting resource updates for host device {key[0]} {key[1]}:{key[2]}")
        by_host[key] = found
        dev["major"], dev["minor"] = found.major, found.minor
        if found.final_path is not None:
            dev["path"] = found.final_path
    if pending:
        raise InvalidArgument("devices missing from the OCI spec: " + " ".join(sorted(pending)))

    resources = _section(linux, "resources", "linux.resources")
    rules = _list(resources, "devices", "linux.resources.devices")
    for rule in rules:
        if not isinstance(rule, dict):
            continue
        hit = by_host.get((rule.get("type", ""), rule.get("major"), rule.get("minor")))
        if hit is not None:
            rule["major"], rule["minor"] = hit.major, hit.minor
    for u in by_host.values():
        rules.append({"allow": True, "type": u.type, "major": u.major, "minor": u.minor,
                      "access": "rwm"})
