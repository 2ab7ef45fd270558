"""Shared test machinery.

``async def`` tests run on a fresh uvloop loop each, with a deadline, and fail
if anything in the loop raised an exception nobody handled (asyncpg/uvloop
style): a server that only logs its crash must still fail the test.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import uvloop

ASYNC_TEST_TIMEOUT = float(os.environ.get("KAGENT_ASYNC_TEST_TIMEOUT", "60"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    errors: list[dict] = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with asyncio.timeout(ASYNC_TEST_TIMEOUT):
            await fn(**kwargs)
        await asyncio.sleep(0)  # let callbacks scheduled by the test's last step run

    uvloop.run(main())
    if errors:
        text = "; ".join(f"{e.get('message')}: {e.get('exception')!r}" for e in errors)
        pytest.fail(f"unhandled exception(s) in the event loop: {text}")
    return True


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (real namespaces, mounts, cgroups)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tmp_sock_dir():
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def kagent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kagent", *args]


def kagent_ctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kagent.cli.ctl", *args]


class AgentProcess:
    """A kagent started as a real process on a unix socket, stopped and reaped at the end."""

    def __init__(self, sock_dir: str, *extra: str, env: dict | None = None):
        self.sock = os.path.join(sock_dir, "agent.sock")
        self.addr = "unix://" + self.sock
        cmdline = os.path.join(sock_dir, "cmdline")
        if not os.path.exists(cmdline):
            with open(cmdline, "w") as f:
                f.write("console=ttyS0 quiet\n")
        self.log_path = os.path.join(sock_dir, "agent.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            kagent_cmd("--cmdline-file", cmdline, "--server-addr", self.addr, *extra),
            stdout=self._log, stderr=self._log, env={**os.environ, **(env or {})}, cwd=REPO,
        )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def agent_process(tmp_sock_dir):
    procs: list[AgentProcess] = []

    def start(*extra: str, env: dict | None = None) -> AgentProcess:
        p = AgentProcess(tmp_sock_dir, *extra, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
