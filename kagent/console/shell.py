"""The debug shell's process: forked by the zygote, followed by the supervisor through a pidfd.

The supervisor never forks from its threaded loop.  ``spawn_shell`` asks the zygote to fork a
worker with the entry ``console`` (``shell_entry``); that child waits for a "start" record
carrying its pty slave (SCM_RIGHTS) — or opens the console device itself —, becomes a session
leader with the tty as its controlling terminal, and execs the shell.  The zygote reaps it; the
supervisor follows it with a pidfd (exit, signals that can never hit a recycled pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import termios
from collections.abc import Mapping, Sequence
from typing import Any

from kagent import ipc

SHELLS = ("/run/kata-extensions/devkit/bin/devkit-sh", "/bin/bash", "/bin/sh")
ZYGOTE_ENTRY = "console"  # zygote.ENTRIES[ZYGOTE_ENTRY] = "kagent.console.shell:shell_entry"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HANGUP_GRACE = 2.0  # a shell that survives SIGHUP this long is killed


def find_shell(candidates: Sequence[str] = SHELLS) -> str | None:
    """The first existing executable of ``candidates`` (upstream's order), or None."""
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and exec keeps "ignored": a shell must start clean.
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _shell_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("TERM", "vt100")
    env.setdefault("HOME", "/root" if os.path.isdir("/root") else "/")
    return env


def shell_entry(sock: socket.socket, args: dict[str, Any]) -> int:
    """In the zygote's child: wait for "start" (+ the pty slave), then exec the shell.

    args: ``shell`` (path), ``argv`` (list), ``device`` (a tty to open when no slave is sent),
    ``env`` (extra variables).  A failure is sent back as ``{"error": text}``.  Right before
    exec it sends ``{"exec": shell}``; the exec then closes the socket (it is close-on-exec),
    and that EOF after "exec" is the success the supervisor waits for (see ``start_error``).
    """
    os.set_inheritable(sock.fileno(), False)  # SCM_RIGHTS fds arrive without O_CLOEXEC
    try:
        got = ipc.recv(sock, "the debug shell's process")
    except ValueError as exc:  # FdsLost: at its fd limit, the tty did not arrive
        with contextlib.suppress(OSError):
            ipc.send(sock, {"error": f"receive the tty: {exc}"})
        return 127
    if got is None:
        return 0  # the supervisor gave up on this session
    _msg, fds = got
    step = "prepare"
    try:
        _reset_signals()
        step = "setsid"
        os.setsid()
        if fds:
            tty = fds.pop(0)
        else:
            step = f"open {args['device']}"
            tty = os.open(args["device"], os.O_RDWR | os.O_NOCTTY)
        step = "set the controlling tty"
        fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(tty, fd)
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        shell = str(args["shell"])
        argv = [str(a) for a in args.get("argv") or [shell]]
        env = _shell_env(args.get("env"))
        step = f"exec {shell}"
        ipc.send(sock, {"exec": shell})
        os.execve(shell, argv, env)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        with contextlib.suppress(OSError):
            ipc.send(sock, {"error": f"{step}: {exc}"})
        return 127
    return 127  # not reached: execve does not return


class ShellProcess:
    """A shell the zygote forked, followed through a pidfd (the zygote reaps it)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.exited.done():
            self.exited.set_result(None)

    def signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def hangup(self, grace: float = HANGUP_GRACE) -> None:
        """SIGHUP (and SIGCONT, as the tty layer does); SIGKILL if it outlives ``grace``."""
        self.signal(signal.SIGHUP)
        self.signal(signal.SIGCONT)
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.exited


async def spawn_shell(zygote: ipc.Channel, args: dict[str, Any], tty_fd: int | None = None) -> ShellProcess:
    """Have the zygote fork a shell; returns once it has exec'd. OSError when it cannot."""
    if zygote.closed.done():
        raise OSError(errno.ESRCH, "the zygote is gone")
    loop = asyncio.get_running_loop()
    mine, theirs = ipc.socketpair()
    try:
        try:
            reply, fds = await zygote.request({"op": "spawn", "entry": ZYGOTE_ENTRY, "args": args},
                                              [theirs.fileno()])
        except ipc.ChannelClosed as exc:
            raise OSError(errno.ESRCH, str(exc)) from None
        finally:
            theirs.close()
        for fd in fds:
            os.close(fd)
        if "error" in reply:
            raise OSError(errno.EIO, f"zygote: {reply['error']}")
        pid = int(reply["pid"])
        # The child is blocked reading `mine`: its pid cannot have been reused yet.
        pidfd = os.pidfd_open(pid)
        mine.setblocking(False)
        try:
            socket.send_fds(mine, [b'{"op":"start"}'], [tty_fd] if tty_fd is not None else [])
            records = []
            while len(records) < 4 and (data := await loop.sock_recv(mine, ipc.MAX_RECORD)):
                records.append(data)  # until EOF: the exec (close-on-exec), or the child's exit
            error = start_error(records)
            if error is not None:
                raise OSError(errno.EIO, f"debug shell: {error}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):  # through the pidfd: never a reused pid
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            raise
        return ShellProcess(pid, pidfd)
    finally:
        mine.close()


def start_error(records: Sequence[bytes]) -> str | None:
    """What the shell's process sent before its socket closed: None when it exec'd the shell
    ("exec", then EOF), else why not.  EOF alone is no success: that child died before exec
    without a word (its tty lost on the way, a crash)."""
    decoded = []
    for data in records:
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            return f"unexpected reply {data[:200]!r}"
        if "error" in record:
            return str(record["error"])
        decoded.append(record)
    if [sorted(r) for r in decoded] == [["exec"]]:
        return None
    if not decoded:
        return "its process exited before it could start the shell (it sent no reply)"
    return f"unexpected reply {records[-1][:200]!r}"
