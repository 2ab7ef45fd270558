"""Fixtures for the agent-policy tests: a policy-enforcing kagent process, a busybox rootfs."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from policy_harness import AgentProc
from support import busybox_rootfs


@pytest.fixture(scope="session")
def rootfs():
    with busybox_rootfs("kagent-policy-rootfs-") as path:
        yield path


@pytest.fixture
def start_agent():
    """``start_agent(policy_text)``: a kagent whose start-up policy is ``policy_text``
    (given through KATA_AGENT_POLICY_FILE); None starts it without a policy."""
    started: list[tuple[AgentProc, str]] = []

    def start(policy: str | None = None, **env: str) -> AgentProc:
        workdir = tempfile.mkdtemp(prefix="kagp-", dir="/tmp")
        if policy is not None:
            path = os.path.join(workdir, "policy.rego")
            with open(path, "w") as f:
                f.write(policy)
            env.setdefault("KATA_AGENT_POLICY_FILE", path)
        agent = AgentProc(workdir, env)
        started.append((agent, workdir))
        return agent

    yield start
    failures = []
    for agent, workdir in started:
        rc = agent.stop()
        log = agent.log()
        shutil.rmtree(workdir, ignore_errors=True)
        if rc != 0 or "Traceback" in log:
            failures.append(f"kagent exited with {rc}:\n{log[-4000:]}")
    assert not failures, "\n".join(failures)
