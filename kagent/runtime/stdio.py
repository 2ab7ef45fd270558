"""A container process's stdio: three close-on-exec pipes, or a pty.

The worker keeps the ParentStdio ends (and passes them on to the supervisor);
the forked child puts the ChildStdio ends on 0/1/2.  Every descriptor is
close-on-exec, so nothing leaks into other processes the worker starts.
``pipe_size`` (agent.container_pipe_size) enlarges stdout/stderr with
F_SETPIPE_SZ; above /proc/sys/fs/pipe-max-size that needs CAP_SYS_RESOURCE,
which the guest may lack, so the error says which limit was hit.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"


def _close(*fds: int | None) -> None:
    for fd in dict.fromkeys(fds):
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class ParentStdio:
    """The worker's ends: write to ``stdin``, read ``stdout``/``stderr``.

    With a terminal, ``stdin`` and ``stdout`` are the same pty master and
    ``stderr`` is None (the tty merges the streams).
    """

    stdin: int
    stdout: int
    stderr: int | None
    terminal: bool

    @property
    def master(self) -> int | None:
        return self.stdin if self.terminal else None

    def close(self) -> None:
        _close(self.stdin, self.stdout, self.stderr)
        self.stdin = self.stdout = -1
        self.stderr = None


@dataclass
class ChildStdio:
    """The container process's ends (the pty slave three times with a terminal).

    A terminal is made by the container process itself, from the container's own
    /dev/ptmx, so that it is a /dev/pts entry of the container's devpts (``tty``
    names it, programs that look their tty up find it).  Until then the fds are
    -1 and ``console`` is the ParentStdio that receives the master.
    """

    stdin: int
    stdout: int
    stderr: int
    terminal: bool
    console: ParentStdio | None = None

    @property
    def wants_console(self) -> bool:
        return self.terminal and self.stdin < 0

    def close(self) -> None:
        _close(self.stdin, self.stdout, self.stderr)
        self.stdin = self.stdout = self.stderr = -1


def pipe_max_size() -> int:
    with open(PIPE_MAX_SIZE) as f:
        return int(f.read())


def set_pipe_size(fd: int, size: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except PermissionError as exc:
        try:
            limit: object = pipe_max_size()
        except (OSError, ValueError):
            limit = "unknown"
        raise PermissionError(
            errno.EPERM,
            f"pipe size {size} exceeds {PIPE_MAX_SIZE} ({limit}) and the agent lacks CAP_SYS_RESOURCE; "
            "raise the limit first (raise_pipe_max_size) or ask for a smaller size",
        ) from exc


def raise_pipe_max_size(size: int) -> int:
    """Raise /proc/sys/fs/pipe-max-size to at least ``size``; return the previous value.

    A policy for the caller (the agent at start-up), never done implicitly:
    it changes a guest-wide setting.
    """
    old = pipe_max_size()
    if size > old:
        with open(PIPE_MAX_SIZE, "w") as f:
            f.write(str(size))
    return old


def make_stdio(terminal: bool, pipe_size: int = 0) -> tuple[ParentStdio, ChildStdio]:
    if terminal:
        parent = ParentStdio(-1, -1, None, True)  # filled in when the child sends the master
        return parent, ChildStdio(-1, -1, -1, True, console=parent)
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe2(os.O_CLOEXEC))
        in_r, in_w, out_r, out_w, err_r, err_w = fds
        if pipe_size > 0:
            set_pipe_size(out_w, pipe_size)
            set_pipe_size(err_w, pipe_size)
    except BaseException:
        _close(*fds)
        raise
    return ParentStdio(in_w, out_r, err_r, False), ChildStdio(in_r, out_w, err_w, False)


# Not in Python's termios (asm-generic encodings: x86_64 and aarch64 alike).
TIOCSPTLCK = 0x40045431  # unlockpt
TIOCGPTN = 0x80045430  # the pty's number
TIOCGPTPEER = 0x5441  # open the slave of a master without a path lookup (Linux 4.13+)


def open_console() -> tuple[int, int]:
    """A new pty from /dev/ptmx in the current mount namespace: (master, slave), close-on-exec."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, b"\0\0\0\0")  # unlockpt
        try:
            slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            number = int.from_bytes(fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0"), "little")
            slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def receive_console(stdio: ChildStdio, fd: int) -> None:
    """In the worker: the master a container process sent; it serves stdin and stdout."""
    parent = stdio.console
    if parent is None or parent.stdin >= 0:
        os.close(fd)
        raise ValueError("unexpected console from the container process")
    parent.stdin = parent.stdout = fd
