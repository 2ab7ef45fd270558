"""Kernel uevent messages (NETLINK_KOBJECT_UEVENT): bytes in, a Uevent record out.

A kernel uevent is ``action@devpath\\0KEY=VALUE\\0KEY=VALUE\\0...``::

    add@/devices/virtual/net/lo\\0ACTION=add\\0DEVPATH=/devices/virtual/net/lo\\0
    SUBSYSTEM=net\\0INTERFACE=lo\\0IFINDEX=1\\0SEQNUM=844\\0

``parse`` never raises for bad content: a message that is not a kernel uevent gives
None — empty, larger than MAX_MESSAGE_SIZE, a udevd ("libudev\\0") re-broadcast, a
header without ``@``, no ACTION, no DEVPATH (or one not starting with "/"), or a
SEQNUM that is not a decimal u64.  Parts without "=" (or with an empty key) are
skipped, as upstream does.  Only a ``data`` that is not a bytes-like object raises
(TypeError): that is a caller's bug, not a message.

This file holds the pure-Python twin ``py_parse`` and binds ``parse`` to the compiled
``kagent._fast.uevent.parse`` unless ``KAGENT_NO_EXTENSIONS=1`` or it failed to load
(then ``kagent._fast.status()`` says so and the guard test fails).
"""

from __future__ import annotations

from collections.abc import Callable

from kagent import _fast
from kagent.devices.uevent_defs import (
    ACTION_ADD,
    ACTION_CHANGE,
    ACTION_REMOVE,
    LIBUDEV_MAGIC,
    MAX_MESSAGE_SIZE,
    MAX_SEQNUM_DIGITS,
    Uevent,
)

__all__ = [
    "ACTION_ADD",
    "ACTION_CHANGE",
    "ACTION_REMOVE",
    "IMPLEMENTATION",
    "MAX_MESSAGE_SIZE",
    "Uevent",
    "parse",
    "py_parse",
]


def py_parse(data: bytes | bytearray | memoryview) -> Uevent | None:
    """Parse one netlink uevent datagram; None if it is not a well-formed kernel uevent."""
    raw = data if type(data) is bytes else memoryview(data).tobytes()
    if not raw or len(raw) > MAX_MESSAGE_SIZE or raw.startswith(LIBUDEV_MAGIC):
        return None
    # Decoding once and splitting the str is the fastest way in pure Python; splitting on
    # ASCII NUL and "=" gives the same strings as decoding each piece (see the compiled twin).
    parts = raw.decode("utf-8", "surrogateescape").split("\0")
    if "@" not in parts[0]:  # the "action@devpath" header; the fields below are authoritative
        return None
    env: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key:
            env[key] = value
    action = env.get("ACTION")
    devpath = env.get("DEVPATH")
    if not action or not devpath or devpath[0] != "/":
        return None
    seq = env.get("SEQNUM")
    seqnum = None
    if seq is not None:
        if not (0 < len(seq) <= MAX_SEQNUM_DIGITS and seq.isascii() and seq.isdigit()):
            return None
        seqnum = int(seq)
    return Uevent(
        action,
        devpath,
        env.get("SUBSYSTEM", ""),
        env.get("DEVNAME", ""),
        seqnum,
        env.get("INTERFACE", ""),
        env,
    )


_compiled = _fast.load("uevent")

parse: Callable[[bytes | bytearray | memoryview], Uevent | None] = py_parse
IMPLEMENTATION = "pure"
if _compiled is not None:
    parse = _compiled.parse
    IMPLEMENTATION = "compiled"
