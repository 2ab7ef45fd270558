"""A network namespace of the test's own, for real uevents (root only).

``NetnsHolder`` starts a process in a new network namespace and a new mount namespace
where a fresh sysfs is mounted (the host's /sys shows the host's interfaces: writing
to its lo/uevent would touch the host).  ``in_netns`` runs a function in a throwaway
thread that has joined the namespace: a socket it opens stays in that namespace, and
no thread of the test process changes namespace.  The holder is killed by PID on exit,
which destroys the namespace and every interface in it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsHolder:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> NetnsHolder:
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t sysfs sysfs /sys && echo ready && exec sleep 600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            err = self.proc.stderr.read() if self.proc.poll() is not None else b""
            self.__exit__(None, None, None)
            raise RuntimeError(f"netns holder did not start: {err.decode(errors='replace')}")
        return self

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """Run a command inside the namespaces (network and mount)."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-n", "-m", "--", *args],
                              check=True, capture_output=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.proc = None


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """``fn()`` called in a new thread that joined the network namespace of ``pid``."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="netns-joiner")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def uevent_socket_in(pid: int):
    """A plain non-blocking uevent socket (kernel group) in the namespace of ``pid``."""
    import socket

    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, 15)
        s.bind((0, 1))
        return s

    return in_netns(pid, make)
