"""OCI ``linux.resources`` (runtime-spec JSON keys) → values the drivers write.

Pure functions shared by both drivers: reading the OCI dict the way upstream
does (a zero or missing scalar means "unset"), the device rules, and the v2
conversions (shares → weight, memory+swap → swap, blkio weight → io weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kagent import errors

__all__ = [
    "DeviceRule",
    "DEFAULT_DEVICE_RULES",
    "device_rules",
    "shares_to_weight",
    "blkio_weight_to_io_weight",
    "swap_to_v2",
    "limit_text",
    "hugepage_size",
]

MAX_INT64 = (1 << 63) - 1


def section(resources: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    value = (resources or {}).get(key)
    return value if isinstance(value, Mapping) else {}


def num(sec: Mapping[str, Any], key: str) -> int | None:
    """An integer field; None when missing or zero (proto3 and upstream: zero is unset)."""
    value = sec.get(key)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidArgument(f"resources: {key} must be an integer, not {value!r}")
    return value


def limit_text(value: int) -> str:
    """A v1 limit: -1 (or any negative) is unlimited and the kernel takes "-1"."""
    return "-1" if value < 0 else str(value)


def max_text(value: int) -> str:
    """A v2 limit: negative is "max"."""
    return "max" if value < 0 else str(value)


def hugepage_size(limit: Mapping[str, Any]) -> str:
    # runtime-spec spells it pageSize; a proto round trip gives pagesize
    size = limit.get("pageSize") or limit.get("pagesize") or ""
    if not isinstance(size, str) or not size or "/" in size or not size[0].isdigit():
        raise errors.InvalidArgument(f"resources: invalid hugepage size {size!r}")
    return size


# --- v2 conversions (as upstream and runc) -------------------------------------------------------


def shares_to_weight(shares: int) -> int:
    """cpu.shares [2, 262144] → cpu.weight [1, 10000]."""
    if shares <= 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio.weight [10, 1000] → io.weight [1, 10000]."""
    if weight <= 0:
        return 0
    return 1 + ((weight - 10) * 9999) // 990


def swap_to_v2(swap: int | None, limit: int | None) -> int | None:
    """OCI swap is memory+swap (v1 memsw); v2 memory.swap.max is swap alone.

    None: leave memory.swap.max alone; -1: "max".
    """
    if swap is None:
        return None
    if swap < 0:
        return -1
    if limit is None or limit < 0:
        raise errors.InvalidArgument("resources: memory.swap needs a memory.limit on cgroup v2 (swap is memory+swap)")
    if swap < limit:
        raise errors.InvalidArgument(f"resources: memory.swap ({swap}) must be >= memory.limit ({limit})")
    return swap - limit


# --- device rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRule:
    """One device cgroup rule; major/minor None means any ("*")."""

    allow: bool
    type: str  # "a", "c" or "b"
    major: int | None
    minor: int | None
    access: str  # a subset of "rwm", in that order

    def v1_text(self) -> str:
        """The line for devices.allow / devices.deny."""
        if self.type == "a":
            return f"a *:* {self.access}"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {self.access}"

    @property
    def all_devices(self) -> bool:
        return self.type == "a" or (self.major is None and self.minor is None and self.type == "")


def _wild(value: Any, what: str) -> int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument(f"resources: device {what} must be a non-negative integer, not {value!r}")
    return value


def rule(entry: Mapping[str, Any]) -> DeviceRule:
    """An OCI LinuxDeviceCgroup → DeviceRule (type missing or "" is all devices)."""
    kind = entry.get("type") or "a"
    if kind not in ("a", "c", "b"):
        raise errors.InvalidArgument(f"resources: invalid device type {kind!r} (use a, c or b)")
    access = entry.get("access") or "rwm"
    if not isinstance(access, str) or not set(access) <= set("rwm"):
        raise errors.InvalidArgument(f"resources: invalid device access {access!r} (a subset of rwm)")
    access = "".join(c for c in "rwm" if c in access)
    major = None if kind == "a" else _wild(entry.get("major"), "major")
    minor = None if kind == "a" else _wild(entry.get("minor"), "minor")
    return DeviceRule(bool(entry.get("allow", False)), kind, major, minor, access)


def _allow(kind: str, major: int | None, minor: int | None, access: str = "rwm") -> DeviceRule:
    return DeviceRule(True, kind, major, minor, access)


#: what every container may use whatever its spec says (upstream's DEFAULT_DEVICES
#: and DEFAULT_ALLOWED_DEVICES): mknod of anything, the standard /dev nodes, ptys, tun
DEFAULT_DEVICE_RULES: tuple[DeviceRule, ...] = (
    _allow("c", None, None, "m"),
    _allow("b", None, None, "m"),
    _allow("c", 1, 3),  # /dev/null
    _allow("c", 1, 5),  # /dev/zero
    _allow("c", 1, 7),  # /dev/full
    _allow("c", 5, 0),  # /dev/tty
    _allow("c", 1, 9),  # /dev/urandom
    _allow("c", 1, 8),  # /dev/random
    _allow("c", 5, 1),  # /dev/console
    _allow("c", 136, None),  # /dev/pts/N
    _allow("c", 5, 2),  # /dev/ptmx
    _allow("c", 10, 200),  # /dev/net/tun
)


def device_rules(entries: Iterable[Mapping[str, Any]] | None, *, defaults: bool) -> list[DeviceRule]:
    """The container's rules in order, then the defaults (allows, so they win over a deny-all)."""
    rules = [rule(e) for e in entries or ()]
    if defaults:
        rules.extend(DEFAULT_DEVICE_RULES)
    return rules


def allows_all(rules: Iterable[DeviceRule]) -> bool:
    """Whether the rules end up allowing every device (a later deny-all undoes an allow-all)."""
    state = False
    for r in rules:
        if r.all_devices and set(r.access) >= set("rwm"):
            state = r.allow
    return state
