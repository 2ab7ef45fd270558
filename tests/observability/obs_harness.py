"""Helpers for the observability tests: a zygote that knows the console entry, a console
client over a unix socket, and waiting for processes to go."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time

from kagent import ipc, zygote
from kagent.console import HELLO

# A quiet, predictable shell for tests: dash reads no rc file, and the prompt is ours.
TEST_SHELL = "/bin/sh"
PROMPT = "kag$ "
SHELL_ENV = {"PS1": PROMPT, "ENV": "", "TERM": "dumb"}


def fork_test_zygote() -> zygote.ZygoteHandle:
    """A zygote as the agent forks it, with the console entry (the agent's zygote gets it from
    zygote.ENTRIES; registering it here works for either)."""
    zygote.register_entry("console", "kagent.console.shell:shell_entry")
    return zygote.fork_zygote()


def stop_zygote(handle: zygote.ZygoteHandle) -> None:
    handle.sock.close()  # EOF: the zygote exits by itself
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pid, _ = os.waitpid(handle.pid, os.WNOHANG)
        if pid:
            return
        time.sleep(0.01)
    os.kill(handle.pid, signal.SIGKILL)
    os.waitpid(handle.pid, 0)


def zygote_channel(handle: zygote.ZygoteHandle) -> ipc.Channel:
    """The supervisor's side, on the running loop (exit events are the zygote's business)."""
    return ipc.Channel(handle.sock, lambda _e, fds: [os.close(fd) for fd in fds], name="zygote")


class ConsoleClient:
    """A raw byte-stream client of a console session (what socat would be)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seen = b""

    @classmethod
    async def connect(cls, path: str) -> ConsoleClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 10.0) -> re.Match:
        """Read until ``pattern`` (a regex) matches what arrived since the last match."""
        if isinstance(pattern, re.Pattern):
            rx = pattern
        else:
            rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        async with asyncio.timeout(timeout):
            while True:
                m = rx.search(self.seen)
                if m:
                    self.seen = self.seen[m.end():]
                    return m
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(f"connection closed; waited for {pattern!r} in {self.seen!r}")
                self.seen += chunk

    async def run(self, command: str, timeout: float = 10.0) -> str:
        """Type a command; return its output (between the echoed line and the next prompt)."""
        n = time.monotonic_ns()
        typed = f'"__do""ne_{n}"'  # the echoed command line differs from the output
        self.send(f"{command}; echo {typed}\n")
        m = await self.expect(re.compile(re.escape(typed.encode()) + rb"\r?\n(.*?)__done_%d\r?\n" % n, re.S),
                              timeout)
        await self.expect(re.escape(PROMPT), timeout)  # the shell is ready for the next line
        return m.group(1).decode(errors="replace").replace("\r\n", "\n")

    async def read_to_eof(self, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                self.seen += chunk
        return self.seen

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer exists (exited and reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.02)
    return False


__all__ = ["ConsoleClient", "HELLO", "PROMPT", "SHELL_ENV", "TEST_SHELL", "fork_test_zygote",
           "stop_zygote", "wait_gone", "zygote_channel"]
