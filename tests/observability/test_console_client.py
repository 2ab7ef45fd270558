"""kagent-ctl console, the host side, driven through a real pty: raw mode, window size at
connect and on SIGWINCH, Ctrl-C passed through, the escape character, a clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import termios
import threading

import pytest
from obs_harness import PROMPT, SHELL_ENV, TEST_SHELL, wait_gone, zygote_channel
from support import REPO

from kagent.cli import console as cli
from kagent.console import HELLO, DebugConsole, set_winsize


class Terminal:
    """The user's terminal: a pty whose slave is the client's stdin/stdout/stderr."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        set_winsize(slave, rows, cols)
        self._slave = slave
        os.set_blocking(self.master, False)
        self.seen = b""
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> None:
        # setsid -c: the client leads a session whose controlling tty is this pty, so the kernel
        # sends it SIGWINCH when the size changes, as a real terminal would.
        prefix = ["setsid", "-c"] if shutil.which("setsid") else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "kagent.cli.console", "console", *args],
            stdin=self._slave, stdout=self._slave, stderr=self._slave, cwd=REPO)
        os.close(self._slave)
        self.has_ctty = bool(prefix)

    async def expect(self, pattern: bytes, timeout: float = 10) -> re.Match:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(self._expect(loop, pattern), timeout)
        except TimeoutError:
            raise AssertionError(f"waited {timeout} s for {pattern!r}; the terminal shows {self.seen!r}") from None

    async def _expect(self, loop, pattern: bytes) -> re.Match:
        while True:
            m = re.search(pattern, self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            ready = loop.create_future()
            loop.add_reader(self.master, lambda r=ready: r.done() or r.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(self.master)
            try:
                self.seen += os.read(self.master, 65536)
            except BlockingIOError:
                pass
            except OSError:  # EIO: the client is gone
                raise EOFError(f"terminal closed; waited for {pattern!r} in {self.seen!r}") from None

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, cols: int) -> None:
        set_winsize(self.master, rows, cols)
        if not self.has_ctty:
            os.kill(self.proc.pid, 28)  # SIGWINCH, what the kernel would have sent

    async def wait(self, timeout: float = 10) -> int:
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


async def _console(zygote, tmp_sock_dir) -> tuple[DebugConsole, str]:
    path = os.path.join(tmp_sock_dir, "console.sock")
    con = DebugConsole(zygote_channel(zygote), address="unix://" + path, shells=[TEST_SHELL], env=SHELL_ENV)
    assert await con.start()
    return con, path


async def test_interactive_session_through_a_terminal(zygote, tmp_sock_dir):
    con, path = await _console(zygote, tmp_sock_dir)
    term = Terminal(33, 99)
    try:
        term.start("--addr", path)
        await term.expect(rb"Escape character is '\^\]'")
        await term.expect(re.escape(PROMPT.encode()))
        # Raw mode: the client's terminal does not echo; the remote pty does, once.
        term.type(b"echo $((40+2))\n")
        await term.expect(rb"echo \$\(\(40\+2\)\)\r\n42\r\n" + re.escape(PROMPT.encode()))
        # The size at connect, then a live resize.
        term.type(b"stty size\n")
        await term.expect(rb"\n33 99\r\n" + re.escape(PROMPT.encode()))
        term.resize(50, 160)
        await asyncio.sleep(0.2)
        term.type(b"stty size\n")
        await term.expect(rb"\n50 160\r\n")
        # Ctrl-C goes to the remote foreground process, not to the client.
        term.type(b"sleep 60\n")
        await asyncio.sleep(0.3)
        term.type(b"\x03")
        await term.expect(re.escape(PROMPT.encode()), timeout=5)
        term.type(b"echo rc=$?\n")
        await term.expect(rb"rc=130")
        assert term.proc.poll() is None
        # The shell exits: the client exits 0 and gives the terminal back as it was.
        term.type(b"exit\n")
        assert await term.wait() == 0
        fd = os.open(term.slave_name, os.O_RDWR | os.O_NOCTTY)
        try:
            lflag = termios.tcgetattr(fd)[3]
            assert lflag & termios.ICANON and lflag & termios.ECHO
        finally:
            os.close(fd)
        async with asyncio.timeout(5):
            while con.sessions:
                await asyncio.sleep(0.02)
    finally:
        term.close()
        await con.close()


async def test_escape_character_ends_the_session_and_its_shell(zygote, tmp_sock_dir):
    con, path = await _console(zygote, tmp_sock_dir)
    term = Terminal(24, 80)
    try:
        term.start("--addr", "unix://" + path)
        await term.expect(re.escape(PROMPT.encode()))
        term.type(b"echo pid=$$\n")
        pid = int((await term.expect(rb"pid=(\d+)")).group(1))
        term.type(b"\x1d")  # Ctrl-]
        assert await term.wait() == 0
        await term.expect(rb"session closed")
        assert await wait_gone(pid)
    finally:
        term.close()
        await con.close()


async def test_connect_failure_exits_3(tmp_sock_dir):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kagent.cli.console", "console", "--addr", os.path.join(tmp_sock_dir, "none"),
        "--connect-timeout", "0.2", cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == cli.EXIT_CONNECT
    assert b"cannot connect" in err


def _read_until(conn: socket.socket, end: bytes, got: list[bytes]) -> None:
    """Collect what the client sends until ``end`` (then close: the session is over)."""
    conn.settimeout(5)
    with contextlib.suppress(TimeoutError):
        while not b"".join(got).endswith(end) and (data := conn.recv(1024)):
            got.append(data)


def _serve_once(sock: socket.socket, handler) -> threading.Thread:
    def run():
        conn, _ = sock.accept()
        with conn:
            handler(conn)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_hybrid_vsock_handshake_and_plain_upstream_stream(tmp_sock_dir):
    """hvsock://: CONNECT/OK first; an agent without HELLO (upstream) gets no winsize bytes."""
    path = os.path.join(tmp_sock_dir, "kata.hvsock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got = []

    def upstream_like(conn):
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        got.append(line)
        conn.sendall(b"OK 1073741824\n")
        conn.sendall(b"hello from a plain console\r\n")
        _read_until(conn, b"typed\n", got)

    t = _serve_once(srv, upstream_like)
    proc = subprocess.run(
        [sys.executable, "-m", "kagent.cli.console", "console", "--addr", f"hvsock://{path}:1026"],
        input=b"typed\n", capture_output=True, cwd=REPO, timeout=20)
    t.join(5)
    srv.close()
    assert proc.returncode == 0, proc.stderr
    assert got[0] == b"CONNECT 1026\n"
    assert b"".join(got[1:]) == b"typed\n"  # no winsize message: the agent never said HELLO
    assert proc.stdout == b"hello from a plain console\r\n"


def test_kagent_agent_hello_is_stripped_and_size_sent_only_with_a_tty(tmp_sock_dir):
    path = os.path.join(tmp_sock_dir, "c.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got = []

    def kagent_like(conn):
        conn.sendall(HELLO[:4])  # split: the client waits for the rest
        conn.sendall(HELLO[4:] + b"prompt$ ")
        _read_until(conn, b"ls\n", got)

    t = _serve_once(srv, kagent_like)
    proc = subprocess.run([sys.executable, "-m", "kagent.cli.console", "console", "--addr", path],
                          input=b"ls\n", capture_output=True, cwd=REPO, timeout=20)
    t.join(5)
    srv.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"prompt$ "
    assert b"".join(got) == b"ls\n"  # stdin is not a terminal: no size to send


@pytest.mark.parametrize(("argv", "expected"), [
    (["console", "--addr", "x"], True),
    (["--addr", "x", "console"], True),
    (["-a", "console", "Check"], False),  # "console" is the address here
    (["Check"], False),
    (["--compact", "console"], True),
    ([], False),
])
def test_ctl_dispatch_rule(argv, expected):
    assert cli.wants(argv) is expected


def test_escape_notation():
    assert cli.parse_escape("^]") == 0x1D
    assert cli.parse_escape("^c") == 0x03
    assert cli.parse_escape("none") is None
    assert cli.parse_escape("~") == ord("~")
    with pytest.raises(ValueError):
        cli.parse_escape("^^^")
