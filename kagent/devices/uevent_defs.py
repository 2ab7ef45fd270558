"""What both uevent parser twins share: the record they return and the limits they apply.

Kept apart from kagent.devices.uevent so that the compiled twin (kagent._fast.uevent) can
import it without a cycle, as kagent.ttrpc.frame_defs does for the frame codec.
"""

from __future__ import annotations

from typing import NamedTuple

#: The kernel builds a uevent in a 2 KiB environment buffer (UEVENT_BUFFER_SIZE) plus the
#: "action@devpath" header; anything this large is not a kernel uevent.
MAX_MESSAGE_SIZE = 8192

#: udevd's re-broadcasts on the same netlink family start with this (then a binary header).
LIBUDEV_MAGIC = b"libudev\0"

#: SEQNUM is a u64 in decimal: at most 20 digits (and int() of longer strings is bounded anyway).
MAX_SEQNUM_DIGITS = 20

ACTION_ADD = "add"
ACTION_REMOVE = "remove"
ACTION_CHANGE = "change"


class Uevent(NamedTuple):
    """One kernel uevent.

    The six fields upstream keeps are attributes ("" when the message did not carry
    them, ``seqnum`` None); ``env`` holds every KEY=VALUE pair of the message, those
    six included, in the order received (a repeated key keeps its last value).
    Values are decoded as UTF-8 with surrogateescape, so odd bytes survive
    (``os.fsencode`` gives them back).  Treat ``env`` as read-only.
    """

    action: str
    devpath: str
    subsystem: str
    devname: str
    seqnum: int | None
    interface: str
    env: dict[str, str]

    def get(self, key: str, default: str = "") -> str:
        """Any property of the event, e.g. ``uev.get("MAJOR")``."""
        return self.env.get(key, default)
