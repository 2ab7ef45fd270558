"""grpc.AgentService: the host runtime's API.

Handlers stay thin: decode what the request asks, call the part that does it,
shape the response.  RPCs without a handler here are answered UNIMPLEMENTED by
kagent.service.build_routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kagent.agent import Agent


class AgentService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
