"""Process capabilities from ``process.capabilities``: five sets, names → numbers.

The order matters and follows runc:
1. drop_bounding() while we still hold CAP_SETPCAP (before the user switch);
2. the caller sets PR_SET_KEEPCAPS around setuid so permitted survives it;
3. apply() sets effective/permitted/inheritable with capset, then raises ambient.

Capabilities this process does not hold itself cannot be granted (capset says
EPERM): they are dropped with a warning instead of failing the container, as
are names this kernel does not know (this guest, for one, lacks SYS_RESOURCE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import syscalls
from .errors import step

Warn = Callable[[str], None]

# index = capability number (linux/capability.h)
NAMES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]
NUMBERS = {f"CAP_{name}": i for i, name in enumerate(NAMES)}
SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


def name(n: int) -> str:
    return f"CAP_{NAMES[n]}" if n < len(NAMES) else f"CAP_{n}"


def mask(names: list[str], warn: Warn | None = None, last: int | None = None) -> int:
    """A list of names like "CAP_NET_RAW" → a bitmask; unknown names are warned about."""
    last = last_cap() if last is None else last
    bits = 0
    for n in names:
        num = NUMBERS.get(n.upper() if n.upper().startswith("CAP_") else f"CAP_{n.upper()}")
        if num is None or num > last:
            if warn:
                warn(f"capability {n!r} is not known to this kernel: ignored")
            continue
        bits |= 1 << num
    return bits


def names_of(bits: int) -> list[str]:
    return [name(i) for i in range(64) if bits >> i & 1]


@dataclass
class CapSets:
    bounding: int
    effective: int
    permitted: int
    inheritable: int
    ambient: int


def from_spec(caps: dict | None, warn: Warn) -> CapSets | None:
    """None when the process gives no ``capabilities``: then they are left as the kernel makes them."""
    if caps is None:
        return None
    last = last_cap()
    sets = CapSets(*(mask(list(caps.get(s) or []), warn, last) for s in SETS))
    held = syscalls.capget()[1]
    missing = (
        sets.bounding | sets.effective | sets.permitted | sets.inheritable | sets.ambient
    ) & ~held
    if missing:
        warn(f"capabilities not held by the agent, dropped: {', '.join(names_of(missing))}")
        for s in SETS:
            setattr(sets, s, getattr(sets, s) & held)
    unusable = sets.ambient & ~(sets.permitted & sets.inheritable)
    if unusable:
        # the kernel only lets a capability be ambient when it is permitted and inheritable
        warn(
            f"ambient capabilities not permitted and inheritable, dropped: {', '.join(names_of(unusable))}"
        )
        sets.ambient &= ~unusable
    return sets


def drop_bounding(sets: CapSets) -> None:
    for n in range(last_cap() + 1):
        if not sets.bounding >> n & 1 and syscalls.prctl(syscalls.PR_CAPBSET_READ, n) == 1:
            with step(f"drop {name(n)} from the bounding set"):
                syscalls.prctl(syscalls.PR_CAPBSET_DROP, n)


def apply(sets: CapSets) -> None:
    with step("set capabilities"):
        syscalls.capset(sets.effective, sets.permitted, sets.inheritable)
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for n in range(64):
        if sets.ambient >> n & 1:
            with step(f"raise ambient {name(n)}"):
                syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_RAISE, n, 0, 0)
