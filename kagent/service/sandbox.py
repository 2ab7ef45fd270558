"""CreateSandbox and DestroySandbox: the pod's own set-up and its end."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2

from kagent import log as klog
from kagent.protocols import agent_pb2

if TYPE_CHECKING:
    from kagent.agent import Agent

_log = klog.get_logger("sandbox")
EMPTY = empty_pb2.Empty()

# After DestroySandbox's reply has gone out, the agent stops (as init: sync, power off).
STOP_DELAY = 0.1


class SandboxService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def CreateSandbox(self, req: agent_pb2.CreateSandboxRequest, ctx):
        # Hostname in a persistent UTS namespace, a persistent IPC namespace, DNS, kernel
        # modules, guest hooks and the sandbox's storages: kagent.podsetup.
        await self.agent.pod.create(req, self.agent.storages)
        return EMPTY

    async def DestroySandbox(self, req: agent_pb2.DestroySandboxRequest, ctx):
        await self.agent.sandbox.destroy()
        for problem in await self.agent.storages.destroy_all():
            _log.warning("storage not released", problem=problem)
        await self.agent.pod.destroy()
        asyncio.get_running_loop().call_later(STOP_DELAY, self.agent.stop, "DestroySandbox")
        return EMPTY
