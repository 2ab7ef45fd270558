"""ttRPC frame constants and errors, shared by the pure codec and its compiled twin.

This module must not import ``kagent.ttrpc.framing``: the compiled codec imports
it, so both implementations raise the very same exception classes.
"""

from __future__ import annotations

from operator import index

#: length (uint32 BE), stream id (uint32 BE), type (uint8), flags (uint8)
HEADER_SIZE = 10
#: the largest payload Go and Rust ttrpc accept (``messageLengthMax``)
MESSAGE_LENGTH_MAX = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 1
FLAG_REMOTE_OPEN = 2  # Request only
FLAG_NO_DATA = 4  # Data only

UINT32_MAX = 0xFFFFFFFF
UINT8_MAX = 0xFF


class FrameTooLarge(ValueError):
    """A payload longer than the frame limit; carries ``length`` and ``limit``."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(length, limit)
        self.length = length
        self.limit = limit

    def __str__(self) -> str:
        return f"message length {self.length} exceeds the maximum message size of {self.limit}"


def check_field(name: str, value: object, limit: int) -> int:
    """Return ``value`` as an int in 0..limit, else raise TypeError or OverflowError.

    The codecs call this only off their fast path, to give the same error from
    both implementations.
    """
    number = index(value)  # type: ignore[arg-type]  # TypeError for non-integers
    if not 0 <= number <= limit:
        raise OverflowError(f"{name} {number} is out of range 0..{limit}")
    return number


def check_max_length(value: object) -> int:
    """Validate a decoder's or encoder's ``max_length``."""
    number = index(value)  # type: ignore[arg-type]
    if number < 0:
        raise ValueError(f"max_length must be >= 0, not {number}")
    return number
