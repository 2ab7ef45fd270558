"""The debug console: an interactive shell for the developer (agent.debug_console).

Two modes, as upstream:

- without a port, one shell runs on ``/dev/console`` (``shell -i``) as a session leader with
  the console as its controlling tty (job control, Ctrl-C), and is restarted when it exits;
- with ``agent.debug_console_vport=N`` (or, for tests and developers, any address the server
  takes: ``unix:///path``) every connection gets its own pty and shell, so several people can
  connect at once; bytes are copied socket ⇄ pty master on the event loop without blocking;
  a closed connection hangs up its shell (SIGHUP, then SIGKILL if it lingers).

Each shell is forked by the zygote, never by the supervisor's threaded loop (kagent.console.shell);
the window-size exchange is in kagent.console.protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kagent import ipc
from kagent import log as klog
from kagent.console.protocol import HELLO, HOLD_SECONDS, InputFilter, set_winsize
from kagent.console.shell import HANGUP_GRACE, SHELLS, ShellProcess, find_shell, spawn_shell

_log = klog.get_logger("debug-console")

CONSOLE_DEVICE = "/dev/console"
RESERVED_PORTS = {1024: "the ttRPC API port", 1025: "the log forwarding port"}
_PTY_HIGH_WATER = 256 << 10  # socket → pty bytes queued before the socket is paused
_RESTART_MIN_LIFE = 1.0  # a console shell that dies faster than this is restarted with backoff
_RESTART_MAX_DELAY = 30.0


class _Session(asyncio.Protocol):
    """One connection: its pty, its shell, and the copies between them."""

    def __init__(self, console: DebugConsole) -> None:
        self.console = console
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.master = -1
        self.shell: ShellProcess | None = None
        self.filter = InputFilter()
        self._to_pty = bytearray()
        self._writer_armed = False
        self._reading_pty = False
        self._socket_paused = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._finished = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._task: asyncio.Task | None = None

    # -- connection ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.console.sessions.add(self)
        try:
            master, slave = os.openpty()
        except OSError as exc:
            _log.error("no pty for a debug console session", error=str(exc))
            transport.write(f"kagent: no pty for the debug console: {exc}\r\n".encode())
            self._finish()
            return
        self.master = master
        os.set_blocking(master, False)
        with contextlib.suppress(OSError):
            set_winsize(master, 24, 80)
        transport.write(HELLO)
        self._read_pty(True)
        self._task = self.loop.create_task(self._start_shell(slave))

    async def _start_shell(self, slave: int) -> None:
        try:
            shell = await self.console.spawn(slave)
        except Exception as exc:
            _log.error("debug console shell not started", error=str(exc))
            if self.transport is not None:
                self.transport.write(f"kagent: cannot start the debug shell: {exc}\r\n".encode())
            self._finish()
            return
        finally:
            os.close(slave)  # the shell has its copy: the pty now hangs up when the shell goes
        self.shell = shell
        _log.info("debug console session", shell_pid=shell.pid, peer=self._peer())
        if self._finished:  # the host left while the shell was starting
            self.loop.create_task(shell.hangup())
            return
        shell.exited.add_done_callback(lambda _: self._shell_exited())

    def _peer(self) -> str:
        return str(self.transport.get_extra_info("peername") or "") if self.transport else ""

    def data_received(self, data: bytes) -> None:
        if self.master < 0:
            return
        payload, sizes = self.filter.feed(data)
        for rows, cols in sizes:
            with contextlib.suppress(OSError):
                set_winsize(self.master, rows, cols)  # the kernel sends SIGWINCH
        if self.filter.holding and self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_SECONDS, self._release_held)
        if payload:
            self._write_pty(payload)

    def _release_held(self) -> None:
        self._hold_timer = None
        held = self.filter.flush()
        if held and self.master >= 0:
            self._write_pty(held)

    def eof_received(self) -> bool:
        return False  # the host closed: end the session

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish()

    def pause_writing(self) -> None:
        self._read_pty(False)  # the host is slow: let the shell block on its tty

    def resume_writing(self) -> None:
        self._read_pty(True)

    # -- pty → socket -------------------------------------------------------

    def _read_pty(self, on: bool) -> None:
        if self.master < 0 or on == self._reading_pty:
            return
        self._reading_pty = on
        if on:
            self.loop.add_reader(self.master, self._pty_readable)
        else:
            self.loop.remove_reader(self.master)

    def _pty_readable(self) -> None:
        try:
            data = os.read(self.master, 64 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: every slave fd is closed (the shell and its jobs are gone)
            data = b""
        if not data:
            self._finish()
            return
        if self.transport is not None:
            self.transport.write(data)

    # -- socket → pty -------------------------------------------------------

    def _write_pty(self, data: bytes) -> None:
        if not self._to_pty:
            try:
                n = os.write(self.master, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return  # the pty is going away; _pty_readable ends the session
            if n == len(data):
                return
            data = data[n:]
        self._to_pty += data
        if not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self.master, self._pty_writable)
        if not self._socket_paused and len(self._to_pty) > _PTY_HIGH_WATER and self.transport is not None:
            self._socket_paused = True
            self.transport.pause_reading()  # the shell is not reading: stop reading the host

    def _pty_writable(self) -> None:
        try:
            n = os.write(self.master, self._to_pty)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = len(self._to_pty)
        del self._to_pty[:n]
        if not self._to_pty:
            self.loop.remove_writer(self.master)
            self._writer_armed = False
        if self._socket_paused and len(self._to_pty) <= _PTY_HIGH_WATER // 4 and self.transport is not None:
            self._socket_paused = False
            self.transport.resume_reading()

    # -- the end ------------------------------------------------------------

    def _shell_exited(self) -> None:
        # Output the shell wrote just before exiting may still be in the tty layer: read until
        # the pty reports EIO (all slaves closed), but not longer than a moment.
        if not self._finished:
            self.loop.call_later(0.5, self._finish)

    def _finish(self) -> None:
        """End the session: hang up the shell, close pty and connection. Idempotent."""
        if self._finished:
            return
        self._finished = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.master >= 0:
            self._read_pty(False)
            if self._writer_armed:
                self.loop.remove_writer(self.master)
                self._writer_armed = False
            os.close(self.master)  # the tty hangs up: its session gets SIGHUP
            self.master = -1
        if self.transport is not None:
            self.transport.close()  # after what is buffered is written
        shell = self.shell
        if shell is not None and not shell.exited.done():
            waiter = self.loop.create_task(shell.hangup())
            waiter.add_done_callback(lambda _: self._done())
        elif self._task is not None and not self._task.done():
            self._task.add_done_callback(lambda _: self._after_start())
        else:
            self._done()

    def _after_start(self) -> None:
        shell = self.shell
        if shell is not None and not shell.exited.done():
            shell.exited.add_done_callback(lambda _: self._done())
        else:
            self._done()

    def _done(self) -> None:
        self.console.sessions.discard(self)
        if not self.done.done():
            self.done.set_result(None)
        if self.shell is not None:
            _log.info("debug console session ended", shell_pid=self.shell.pid)


class DebugConsole:
    """The debug console of one agent.

    zygote: the supervisor's channel to the zygote (``agent.zygote_channel``).
    address: where to listen (``vsock://-1:N``, ``unix:///path``); None = ``device``.
    """

    def __init__(self, zygote: ipc.Channel | None, *, address: str | None = None,
                 device: str = CONSOLE_DEVICE, shells: Sequence[str] = SHELLS,
                 env: Mapping[str, str] | None = None) -> None:
        self.zygote = zygote
        self.address = address
        self.device = device
        self.shells = tuple(shells)
        self.env = dict(env or {})
        self.sessions: set[_Session] = set()
        self._server: asyncio.AbstractServer | None = None
        self._socket_file: str | None = None
        self._console_task: asyncio.Task | None = None
        self.console_shell: ShellProcess | None = None
        self.running = False

    @staticmethod
    def address_for(vport: int, override: str | None = None) -> str | None:
        """The listen address for ``agent.debug_console_vport`` (or the developer override);
        None for /dev/console. ValueError for the reserved ports."""
        if override:
            return override if "://" in override else "unix://" + override
        if vport in RESERVED_PORTS:
            raise ValueError(f"vsock port {vport} is {RESERVED_PORTS[vport]}")
        return f"vsock://-1:{vport}" if vport > 0 else None

    @classmethod
    def from_config(cls, zygote: ipc.Channel | None, vport: int, address: str | None = None,
                    **kwargs: Any) -> DebugConsole | None:
        """The console the options ask for, or None (after a clear warning) for a reserved port."""
        try:
            addr = cls.address_for(vport, address)
        except ValueError as exc:
            _log.warning("debug console not started: its port is reserved", vport=vport, reason=str(exc))
            return None
        return cls(zygote, address=addr, **kwargs)

    async def spawn(self, tty_fd: int | None = None, argv_extra: Sequence[str] = ()) -> ShellProcess:
        shell = find_shell(self.shells)
        if shell is None:
            raise OSError(errno.ENOENT, f"no shell found to launch debug console (looked for {', '.join(self.shells)})")
        if self.zygote is None:
            raise OSError(errno.ESRCH, "the debug console needs the zygote to fork shells")
        args: dict[str, Any] = {"shell": shell, "argv": [shell, *argv_extra], "env": self.env}
        if tty_fd is None:
            args["device"] = self.device
        return await spawn_shell(self.zygote, args, tty_fd)

    async def start(self) -> bool:
        """Start serving; False (logged, never raised) when there is no console to run."""
        if find_shell(self.shells) is None:
            _log.error("no shell found to launch debug console; the agent goes on without it",
                       searched=list(self.shells))
            return False
        if self.address is None:
            self._console_task = asyncio.get_running_loop().create_task(self._console_loop())
            self.running = True
            _log.info("debug console", device=self.device)
            return True
        from kagent.ttrpc.addresses import parse
        from kagent.ttrpc.transports import listen

        try:
            addr = parse(self.address)
            self._server = await listen(addr, lambda: _Session(self))
        except (OSError, ValueError) as exc:
            _log.error("debug console not started: cannot listen", address=self.address, error=str(exc))
            return False
        if addr.scheme == "unix" and not addr.abstract:
            self._socket_file = addr.path
        self.running = True
        _log.info("debug console listening", address=self.address)
        return True

    async def _console_loop(self) -> None:
        """One shell on the console device, restarted when it exits (with backoff if it dies
        at once, so a broken console cannot spin the agent)."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        warned = False
        while True:
            if delay:
                await asyncio.sleep(delay)
            started = loop.time()
            try:
                self.console_shell = await self.spawn(None, ("-i",))
            except OSError as exc:
                (_log.warning if not warned else _log.debug)("debug console shell not started",
                                                              device=self.device, error=str(exc))
                warned = True
                delay = min(max(delay * 2, 1.0), _RESTART_MAX_DELAY)
                continue
            _log.info("debug console shell started", device=self.device, shell_pid=self.console_shell.pid)
            await asyncio.wait([self.console_shell.exited])  # never cancels the shared future
            self.console_shell = None
            lived = loop.time() - started
            delay = 0.0 if lived >= _RESTART_MIN_LIFE else min(max(delay * 2, 0.5), _RESTART_MAX_DELAY)
            _log.info("debug console shell exited; restarting", device=self.device, restart_in=delay)

    async def close(self) -> None:
        """Stop listening, hang up every session and wait for the shells to go."""
        self.running = False
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._socket_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_file)
            self._socket_file = None
        if self._console_task is not None:
            self._console_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._console_task
            self._console_task = None
        if self.console_shell is not None:
            await self.console_shell.hangup()
            self.console_shell = None
        sessions = list(self.sessions)
        for s in sessions:
            s._finish()
        if sessions:
            await asyncio.wait([s.done for s in sessions], timeout=HANGUP_GRACE + 1)

