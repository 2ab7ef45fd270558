"""Fixtures for end-to-end container tests."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from e2e import Agent
from support import busybox_rootfs


@pytest.fixture(scope="session")
def rootfs():
    with busybox_rootfs("kagent-e2e-rootfs-") as path:
        yield path


@pytest.fixture
def agent():
    workdir = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
    a = Agent(workdir)
    try:
        yield a
    finally:
        a.proc.terminate()
        try:
            a.proc.wait(15)
        except Exception:
            pass
        leftover = a.cgroup_dirs()  # the agent removes its empty cgroups when it stops
        rc = a.stop()
        log = a.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert rc == 0, f"kagent exited with {rc}:\n{log[-4000:]}"
        assert leftover == [], f"cgroups left behind: {leftover}"
        assert '"level":"error"' not in log or "worker died" in log, log[-4000:]
