"""The worker ⇄ container-child channel used while a container process is set up.

A SOCK_SEQPACKET socketpair, one JSON object per record, both ends close-on-exec.
The child's end vanishes when it execs, so EOF on the parent's end means
"exec happened" (or "the child died": the caller tells them apart with waitpid).
Messages carry a ``type`` and a few plain fields:

    child → parent: userns, hooks, warning, pid, ready, error
    parent → child: go, mapped, hooked, start
"""

from __future__ import annotations

import json
import os
import socket

_MAX = 65536


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: str, /, **fields: object) -> None:  # fields may hold a "kind"
        fields["type"] = kind
        self.sock.send(json.dumps(fields).encode())

    def send_fd(self, kind: str, fd: int, /, **fields: object) -> None:
        """A message carrying one descriptor (SCM_RIGHTS): the console's pty master."""
        fields["type"] = kind
        socket.send_fds(self.sock, [json.dumps(fields).encode()], [fd])

    def recv(self) -> dict | None:
        """The next message, or None at EOF (the other end exec'd, exited or closed).

        A descriptor that came with the message is in ``msg["fd"]`` (the caller owns it).
        """
        try:
            raw, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX, 1)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not raw:
            for fd in fds:
                os.close(fd)
            return None
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError(f"malformed set-up message: {raw[:100]!r}")
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise
        if fds:
            msg["fd"] = fds[0]
        return msg

    def expect(self, kind: str) -> dict:
        """In the child: wait for the parent's go-ahead; anything else means stop."""
        msg = self.recv()
        if msg is None or msg.get("type") != kind:
            raise _Abandoned(kind, msg)
        return msg

    def close(self) -> None:
        self.sock.close()


class _Abandoned(Exception):
    """The parent closed the channel or sent something unexpected: give up quietly."""

    def __init__(self, wanted: str, got: dict | None) -> None:
        super().__init__(f"expected {wanted!r} from the worker, got {got!r}")
