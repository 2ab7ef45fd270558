"""A kagent process that enforces the agent policy, and a client that calls RPCs by name.

Run as a script, this starts kagent exactly as ``python -m kagent`` does, with a test-only
subclass of kagent.agent.Agent that adds what the policy needs (the start-up policy, the
interceptor, the SetPolicy service) when kagent.agent does not do it yet.  Once the agent
integrates the policy itself, the subclass adds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from kagent import oci, protocols
from kagent.ttrpc.client import Client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class AgentProc:
    """The policy-enforcing kagent on a unix socket; ``env`` reaches its environment."""

    def __init__(self, workdir: str, env: dict[str, str] | None = None, cmdline: str = "quiet") -> None:
        self.workdir = workdir
        self.addr = "unix://" + os.path.join(workdir, "agent.sock")
        self.run_dir = os.path.join(workdir, "run")
        cmdline_file = os.path.join(workdir, "cmdline")
        with open(cmdline_file, "w") as f:
            f.write(cmdline + "\n")
        self.log_path = os.path.join(workdir, "agent.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--cmdline-file", cmdline_file,
                 "--server-addr", self.addr, "--log-level", "debug"],
                stdout=log, stderr=log, cwd=REPO,
                env={**os.environ, "KAGENT_RUN_DIR": self.run_dir, **(env or {})})

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Calls:
    """RPCs by name: ``await calls.CreateContainer(container_id=..., OCI=...)``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str):
        method = protocols.find(name)

        async def call(timeout: float | None = 60, **fields):
            return await self.client.call(method.service, method.name, method.request(**fields),
                                          method.response, timeout=timeout)

        return call

    async def create(self, cid: str, spec: dict, **kw):
        return await self.CreateContainer(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec), **kw)


async def connect(agent: AgentProc) -> Calls:
    return Calls(await Client.connect(agent.addr, timeout=20))


def _main() -> int:
    import kagent.__main__

    return kagent.__main__.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())
