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
import tempfile

import pytest
import uvloop
from support import AgentProcess

ASYNC_TEST_TIMEOUT = float(os.environ.get("KAGENT_ASYNC_TEST_TIMEOUT", "60"))


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
