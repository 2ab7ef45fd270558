"""The debug console: shells forked by the zygote, on a pty per connection or on a console
device, driven through real ptys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import signal

import pytest
from obs_harness import (
    HELLO,
    PROMPT,
    SHELL_ENV,
    TEST_SHELL,
    ConsoleClient,
    wait_gone,
    zygote_channel,
)

from kagent import console
from kagent.console import DebugConsole, InputFilter, encode_winsize
from kagent.console.shell import start_error


async def _served(zygote, tmp_sock_dir, **kw) -> tuple[DebugConsole, str]:
    path = os.path.join(tmp_sock_dir, "console.sock")
    con = DebugConsole(zygote_channel(zygote), address="unix://" + path, shells=[TEST_SHELL],
                       env=SHELL_ENV, **kw)
    assert await con.start()
    return con, path


async def _session(path: str) -> ConsoleClient:
    c = await ConsoleClient.connect(path)
    await c.expect(re.escape(HELLO))
    await c.expect(re.escape(PROMPT))
    return c


async def test_command_output_and_shell_is_a_session_leader_on_its_pty(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        c = await _session(path)
        assert (await c.run("echo hello-$((6*7))")).strip() == "hello-42"
        # setsid + controlling tty: the shell leads its session, and `tty` names its pty.
        pid = int((await c.run("echo $$")).strip())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ppid, pgrp, session, tty_nr = (int(x) for x in fields[1:5])
        assert session == pid and tty_nr != 0
        assert ppid == zygote.pid  # forked by the zygote, not by the supervisor
        assert (await c.run("tty")).strip().startswith("/dev/pts/")
        # Signal dispositions start clean (Python ignores SIGPIPE; the shell must not).
        assert (await c.run("yes | head -n 2")).split() == ["y", "y"]
        await c.close()
        assert await wait_gone(pid)
    finally:
        await con.close()


async def test_ctrl_c_reaches_the_foreground_process(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        c = await _session(path)
        c.send("sleep 60\n")
        await c.expect("sleep 60\r?\n")
        await asyncio.sleep(0.3)  # let sleep start
        c.send(b"\x03")
        await c.expect(re.escape(PROMPT), timeout=5)  # long before 60 s
        assert int(await c.run("echo $?")) == 128 + signal.SIGINT
        assert (await c.run("echo still-here")).strip() == "still-here"
        await c.close()
    finally:
        await con.close()


async def test_window_size_set_at_start_and_changed_live(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        c = await _session(path)
        assert (await c.run("stty size")).strip() == "24 80"  # the default
        c.send(encode_winsize(40, 132))
        assert (await c.run("stty size")).strip() == "40 132"
        # A resize while a program runs reaches it as SIGWINCH.
        c.send("trap 'echo winched; stty size' WINCH; sleep 1 & wait\n")
        await asyncio.sleep(0.3)
        # The message split across writes is still recognised, and never reaches the shell.
        msg = encode_winsize(33, 99)
        c.send(msg[:5])
        await c.writer.drain()
        await asyncio.sleep(0.01)
        c.send(msg[5:])
        m = await c.expect(rb"winched\r?\n(\d+ \d+)")
        assert m.group(1) == b"33 99"
        await c.expect(re.escape(PROMPT))
        assert "kagent-winsize" not in (await c.run("echo x")) + c.seen.decode(errors="replace")
        await c.close()
    finally:
        await con.close()


async def test_two_concurrent_sessions_have_their_own_pty_and_shell(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        a, b = await asyncio.gather(_session(path), _session(path))
        pid_a, pid_b = int((await a.run("echo $$")).strip()), int((await b.run("echo $$")).strip())
        tty_a, tty_b = (await a.run("tty")).strip(), (await b.run("tty")).strip()
        assert pid_a != pid_b and tty_a != tty_b
        assert len(con.sessions) == 2
        # Interleaved use: each sees its own state.
        await a.run("X=from-a")
        await b.run("X=from-b")
        assert (await a.run("echo $X")).strip() == "from-a"
        assert (await b.run("echo $X")).strip() == "from-b"
        await a.close()
        assert await wait_gone(pid_a)
        assert (await b.run("echo b-goes-on")).strip() == "b-goes-on"
        await b.close()
        assert await wait_gone(pid_b)
    finally:
        await con.close()


async def test_disconnect_hangs_up_the_shell_and_its_foreground_job(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        c = await _session(path)
        shell_pid = int((await c.run("echo $$")).strip())
        c.send("sleep 300 & echo bg=$!; sleep 301\n")
        bg = int((await c.expect(rb"bg=(\d+)")).group(1))
        await asyncio.sleep(0.2)
        fg = [p for p in _children(shell_pid) if p != bg]
        assert fg, "the foreground sleep is running"
        await c.close()
        # The shell is hung up and reaped (by the zygote); its jobs go with it (SIGHUP).
        for pid in (shell_pid, *fg):
            assert await wait_gone(pid), f"pid {pid} outlived the session"
        async with asyncio.timeout(5):
            while con.sessions:
                await asyncio.sleep(0.02)
        # A background job is in its own process group: the tty's hangup is not for it, and dash
        # does not pass SIGHUP on (bash does). It is ours: end it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(bg, signal.SIGKILL)
    finally:
        await con.close()


async def test_shell_exit_ends_the_connection_cleanly(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    try:
        c = await _session(path)
        c.send("echo bye-now; exit 3\n")
        rest = await c.read_to_eof()
        assert b"bye-now" in rest
        async with asyncio.timeout(5):
            while con.sessions:
                await asyncio.sleep(0.02)
    finally:
        await con.close()


async def test_close_hangs_up_every_session(zygote, tmp_sock_dir):
    con, path = await _served(zygote, tmp_sock_dir)
    c1, c2 = await _session(path), await _session(path)
    pids = [int((await c.run("echo $$")).strip()) for c in (c1, c2)]
    await con.close()
    for pid in pids:
        assert await wait_gone(pid)
    assert await c1.read_to_eof() is not None and await c2.read_to_eof() is not None
    assert not os.path.exists(path)
    await c1.close()
    await c2.close()


async def test_console_device_mode_restarts_the_shell(zygote, tmp_path):
    # A pty stands in for /dev/console: the test holds its master side.
    master, slave = os.openpty()
    device = os.ttyname(slave)
    os.close(slave)
    os.set_blocking(master, False)
    con = DebugConsole(zygote_channel(zygote), device=device, shells=[TEST_SHELL], env=SHELL_ENV)
    loop = asyncio.get_running_loop()
    seen = bytearray()

    async def expect(pattern: bytes, timeout: float = 10) -> re.Match:
        async with asyncio.timeout(timeout):
            while True:
                m = re.search(pattern, bytes(seen))
                if m:
                    del seen[:m.end()]
                    return m
                ready = loop.create_future()
                loop.add_reader(master, lambda r=ready: r.done() or r.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(master)
                try:
                    seen.extend(os.read(master, 65536))
                except (BlockingIOError, OSError):  # EIO while no shell holds the slave
                    await asyncio.sleep(0.02)

    try:
        assert await con.start()
        await expect(re.escape(PROMPT.encode()))
        first = con.console_shell.pid
        os.write(master, b"echo pid=$$\n")
        m = await expect(rb"pid=(\d+)")
        assert int(m.group(1)) == first
        with open(f"/proc/{first}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[3]) == first  # session leader
        # Ctrl-C on the console: job control works there too.
        os.write(master, b"sleep 60\n")
        await asyncio.sleep(0.3)
        os.write(master, b"\x03")
        await expect(re.escape(PROMPT.encode()), timeout=5)
        os.write(master, b"echo st=$?\n")
        assert int((await expect(rb"st=(\d+)")).group(1)) == 130
        os.write(master, b"exit\n")
        assert await wait_gone(first)
        async with asyncio.timeout(10):  # restarted
            while con.console_shell is None or con.console_shell.pid == first:
                await asyncio.sleep(0.02)
        os.write(master, b"echo again=$$\n")
        assert int((await expect(rb"again=(\d+)")).group(1)) == con.console_shell.pid
    finally:
        await con.close()
        os.close(master)


async def test_reserved_ports_refused_with_a_warning(zygote, caplog):
    for port in (1024, 1025):
        assert DebugConsole.from_config(None, port) is None
    assert DebugConsole.address_for(1026) == "vsock://-1:1026"
    assert DebugConsole.address_for(0) is None
    assert DebugConsole.address_for(1024, "/tmp/x.sock") == "unix:///tmp/x.sock"


async def test_no_shell_is_logged_and_the_agent_goes_on(zygote, tmp_path, tmp_sock_dir):
    missing = [str(tmp_path / "no-such-shell"), str(tmp_path / "nor-this")]
    path = os.path.join(tmp_sock_dir, "c.sock")
    con = DebugConsole(zygote_channel(zygote), address="unix://" + path, shells=missing)
    assert await con.start() is False
    assert not os.path.exists(path)
    await con.close()


async def test_shell_that_cannot_start_is_reported_to_the_client(zygote, tmp_sock_dir, tmp_path):
    # An "executable" that exec refuses: the error comes back from the zygote's child.
    bogus = tmp_path / "bogus-shell"
    bogus.write_bytes(b"\x7fELF not really")
    bogus.chmod(0o755)
    con, path = await _served(zygote, tmp_sock_dir)
    con.shells = (str(bogus),)
    try:
        c = await ConsoleClient.connect(path)
        out = await c.read_to_eof()
        assert b"cannot start the debug shell" in out and b"exec" in out
        await c.close()
    finally:
        await con.close()


class _StarvingZygote:
    """The zygote's channel, but the first shell process it forks gets an fd limit of 0 before
    the supervisor sends it its tty: the tty is lost on the way (MSG_CTRUNC), for real."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self.closed = channel.closed
        self.starved: list[int] = []

    async def request(self, obj, fds=()):
        reply, got = await self.channel.request(obj, fds)
        if "pid" in reply and not self.starved:  # the child waits for "start": no race
            pid = int(reply["pid"])
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            self.starved.append(pid)
        return reply, got


async def test_tty_lost_on_the_way_is_a_failed_start_and_the_console_goes_on(zygote, tmp_sock_dir):
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logger = logging.getLogger("kagent.debug-console")
    logger.addHandler(handler)
    starving = _StarvingZygote(zygote_channel(zygote))
    path = os.path.join(tmp_sock_dir, "console.sock")
    con = DebugConsole(starving, address="unix://" + path, shells=[TEST_SHELL], env=SHELL_ENV)
    assert await con.start()
    try:
        c = await ConsoleClient.connect(path)
        out = await c.read_to_eof()
        await c.close()
        assert b"cannot start the debug shell" in out and b"ran out of file descriptors" in out, out
        assert starving.starved and await wait_gone(starving.starved[0])
        assert [r.getMessage() for r in errors] == ["debug console shell not started"], errors
        c = await _session(path)  # the next connection gets its shell
        assert (await c.run("echo still-$((6*7))")).strip() == "still-42"
        await c.close()
    finally:
        logger.removeHandler(handler)
        await con.close()


@pytest.mark.parametrize("records, error", [
    ([b'{"exec": "/bin/sh"}'], None),  # then EOF: the shell runs
    ([], "exited before it could start the shell"),  # EOF alone: died without a word
    ([b'{"error": "setsid: [Errno 1] Operation not permitted"}'], "setsid"),
    ([b'{"exec": "/bin/sh"}', b'{"error": "exec /bin/sh: [Errno 8] Exec format error"}'], "Exec format"),
    ([b"\xff"], "unexpected reply"),
    ([b'{"exec": "/bin/sh"}', b'{"exec": "/bin/sh"}'], "unexpected reply"),
])
def test_start_error(records, error):
    got = start_error(records)
    assert got is None if error is None else error in got, got


def test_find_shell_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    b.write_text("#!/bin/sh\n")
    b.chmod(0o755)
    assert console.find_shell([str(a), str(b)]) == str(b)
    a.write_text("#!/bin/sh\n")
    a.chmod(0o644)  # not executable: skipped
    assert console.find_shell([str(a), str(b)]) == str(b)
    assert console.find_shell([str(a)]) is None


@pytest.mark.parametrize(("chunks", "out", "sizes", "held"), [
    ([b"plain"], b"plain", [], b""),
    ([encode_winsize(40, 120)], b"", [(40, 120)], b""),
    ([b"ab" + encode_winsize(1, 2) + b"cd"], b"abcd", [(1, 2)], b""),
    ([b"ab\x1b_kag", b"ent-winsize 5 6\x1b\\z"], b"abz", [(5, 6)], b""),
    ([b"\x1b"], b"\x1b", [], b""),  # a lone ESC (vi) is never held
    ([b"x\x1b_"], b"x", [], b"\x1b_"),  # Alt-_ may start a message: held briefly
    ([b"\x1b_kagent-winsize 0 5\x1b\\"], b"\x1b_kagent-winsize 0 5\x1b\\", [], b""),
    ([b"\x1b_kagent-winsize a b\x1b\\"], b"\x1b_kagent-winsize a b\x1b\\", [], b""),
    ([b"\x1b_kagent-winsize " + b"9" * 40], b"\x1b_kagent-winsize " + b"9" * 40, [], b""),
])
def test_input_filter(chunks, out, sizes, held):
    f = InputFilter()
    got, got_sizes = b"", []
    for chunk in chunks:
        data, s = f.feed(chunk)
        got += data
        got_sizes += s
    assert (got, got_sizes) == (out, sizes)
    assert f.flush() == held


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out
