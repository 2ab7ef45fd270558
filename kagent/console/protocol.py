"""The debug console's one in-band exchange: window size (sans-I/O, shared by both ends).

Upstream's console is a plain byte stream, so a host cannot resize it.  kagent adds one small,
optional exchange (documented in docs/observability.md):

- the agent starts every session with ``HELLO`` — an APC string (``ESC _ ... ESC \\``), which
  terminals ignore, so ``socat`` users see nothing;
- a client that saw ``HELLO`` may send ``ESC _ kagent-winsize ROWS COLS ESC \\`` at any time;
  the agent strips it from the input and sets the pty's size (the shell gets SIGWINCH).

A client that never saw ``HELLO`` (an upstream agent) sends nothing extra.
"""

from __future__ import annotations

import fcntl
import re
import struct
import termios

HELLO = b"\x1b_kagent-console 1\x1b\\"
WINSIZE_PREFIX = b"\x1b_kagent-winsize "
ST = b"\x1b\\"  # string terminator
_WINSIZE_BODY = re.compile(rb"([0-9]{1,5}) ([0-9]{1,5})")
_MAX_WINSIZE_MSG = len(WINSIZE_PREFIX) + 16 + len(ST)
HOLD_SECONDS = 0.05  # how long a possible start of a winsize message is held back


def encode_winsize(rows: int, cols: int) -> bytes:
    return WINSIZE_PREFIX + f"{rows} {cols}".encode() + ST


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


class InputFilter:
    """Sans-I/O: takes the host's bytes, returns (bytes for the pty, window sizes asked for).

    A chunk that ends with what may be the start of a winsize message (two bytes or more of
    it: a lone ESC is passed at once, for vi) is held back until the next chunk, or until
    ``flush()`` (the caller arms a short timer), so nothing typed is lost or kept long.
    """

    def __init__(self) -> None:
        self._held = b""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        buf = self._held + data if self._held else data
        self._held = b""
        out = bytearray()
        sizes: list[tuple[int, int]] = []
        pos = 0
        while True:
            start = buf.find(WINSIZE_PREFIX, pos)
            if start < 0:
                rest = buf[pos:]
                keep = self._partial_prefix(rest)
                out += rest[:len(rest) - keep]
                self._held = rest[len(rest) - keep:] if keep else b""
                return bytes(out), sizes
            out += buf[pos:start]
            body_at = start + len(WINSIZE_PREFIX)
            end = buf.find(ST, body_at, start + _MAX_WINSIZE_MSG)
            if end < 0:
                if len(buf) - start < _MAX_WINSIZE_MSG:
                    self._held = buf[start:]  # the rest is on its way
                    return bytes(out), sizes
                out += buf[start:body_at]  # too long to be ours: plain input
                pos = body_at
                continue
            m = _WINSIZE_BODY.fullmatch(buf, body_at, end)
            rows, cols = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
            if m and 0 < rows < 65536 and 0 < cols < 65536:
                sizes.append((rows, cols))
            else:
                out += buf[start:end + len(ST)]  # not a valid message: pass it through
            pos = end + len(ST)

    @staticmethod
    def _partial_prefix(tail: bytes) -> int:
        """Length of the longest suffix of ``tail`` (≥ 2) that starts WINSIZE_PREFIX."""
        for n in range(min(len(tail), len(WINSIZE_PREFIX) - 1), 1, -1):
            if WINSIZE_PREFIX.startswith(tail[-n:]):
                return n
        return 0
