"""ReadStdout from a real container, replies sent by copy and by splice: the same bytes either way."""

from __future__ import annotations

import hashlib
import shutil
import tempfile

import pytest
from e2e import Agent, connect

from kagent import devtools

pytestmark = pytest.mark.root

# 8 MiB of numbered 1 KiB lines: order and loss both show in the digest.
SCRIPT = "i=0; while [ $i -lt 8192 ]; do printf '%01023d\\n' $i; i=$((i+1)); done"
EXPECTED = hashlib.sha256(b"".join(b"%01023d\n" % i for i in range(8192))).hexdigest()


async def read_digest(agent: Agent, rootfs: str, size: int) -> tuple[int, str, int]:
    calls = await connect(agent)
    try:
        await calls.create("c1", devtools.default_spec(rootfs, ["/bin/sh", "-c", SCRIPT]))
        await calls.StartContainer(container_id="c1")
        digest, total = hashlib.sha256(), 0
        while True:
            r = await calls.ReadStdout(container_id="c1", exec_id="c1", len=size, timeout=None)
            if not r.data:
                break
            digest.update(r.data)
            total += len(r.data)
        status = (await calls.WaitProcess(container_id="c1", exec_id="c1")).status
        await calls.RemoveContainer(container_id="c1")
        return status, digest.hexdigest(), total
    finally:
        await calls.client.close()


@pytest.mark.parametrize("mode", ["copy", "splice"])
async def test_container_output_is_the_same_by_copy_and_by_splice(rootfs, monkeypatch, mode):
    monkeypatch.setenv("KAGENT_STDIO", mode)
    workdir = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
    agent = Agent(workdir, "agent.container_pipe_size=1048576")
    try:
        for size in (32768, 1 << 20):
            assert await read_digest(agent, rootfs, size) == (0, EXPECTED, 8 << 20)
    finally:
        rc = agent.stop()
        log = agent.log()
        shutil.rmtree(workdir, ignore_errors=True)
    assert rc == 0, log[-3000:]
