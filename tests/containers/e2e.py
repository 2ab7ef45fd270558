"""End-to-end helpers: a real kagent process, and a client that calls RPCs by name."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from kagent import oci, protocols
from kagent.ttrpc.client import Client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Agent:
    """A kagent process on a unix socket with its own run directory."""

    def __init__(self, workdir: str, cmdline: str = "quiet") -> None:
        self.workdir = workdir
        # Containers' cgroups go under a parent of the test's own, removed at the end.
        self.cgroup_parent = f"kagent-test-{uuid.uuid4().hex[:12]}"
        self.sock = os.path.join(workdir, "agent.sock")
        self.addr = "unix://" + self.sock
        self.run_dir = os.path.join(workdir, "run")
        with open(os.path.join(workdir, "cmdline"), "w") as f:
            f.write(f"{cmdline} agent.cgroup_parent={self.cgroup_parent}\n")
        self.log_path = os.path.join(workdir, "agent.log")
        log = open(self.log_path, "wb")
        # A private mount namespace: whatever the agent mounts (sandbox namespaces, DNS over
        # /etc/resolv.conf, storages) stays out of the host's mount table and dies with it.
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "kagent", "--cmdline-file", os.path.join(workdir, "cmdline"),
             "--server-addr", self.addr, "--log-level", "debug"],
            stdout=log, stderr=log, cwd=REPO, env={**os.environ, "KAGENT_RUN_DIR": self.run_dir})
        log.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cgroup_dirs(self) -> list[str]:
        """This agent's top-level cgroup in every mounted hierarchy that has it."""
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype in ("cgroup", "cgroup2"):
                    d = os.path.join(fields[4], self.cgroup_parent)
                    if os.path.isdir(d):
                        found.append(d)
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for top in self.cgroup_dirs():  # a failed test may leave some: ours to remove
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        return self.proc.returncode


class Calls:
    """RPCs by name: ``await calls.CreateContainer(container_id=..., OCI=...)``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str):
        method = protocols.find(name)

        async def call(timeout: float | None = 60, **fields):
            return await self.client.call(method.service, method.name, method.request(**fields), method.response,
                                          timeout=timeout)

        return call

    async def create(self, cid: str, spec: dict, **kw):
        return await self.CreateContainer(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec), **kw)

    async def read_all(self, cid: str, exec_id: str, stream: str = "stdout", size: int = 32768) -> bytes:
        read = self.ReadStdout if stream == "stdout" else self.ReadStderr
        chunks = []
        while True:
            r = await read(container_id=cid, exec_id=exec_id, len=size, timeout=None)
            if not r.data:
                return b"".join(chunks)
            chunks.append(r.data)

    async def run(self, cid: str, spec: dict) -> tuple[int, bytes, bytes]:
        """create, start, read both streams, wait, remove."""
        import asyncio

        await self.create(cid, spec)
        await self.StartContainer(container_id=cid)
        out, err, status = await asyncio.gather(self.read_all(cid, cid), self.read_all(cid, cid, "stderr"),
                                                self.WaitProcess(container_id=cid, exec_id=cid, timeout=None))
        await self.RemoveContainer(container_id=cid)
        return status.status, out, err


async def connect(agent: Agent) -> Calls:
    return Calls(await Client.connect(agent.addr, timeout=20))
