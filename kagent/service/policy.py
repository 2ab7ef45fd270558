"""grpc.AgentService SetPolicy: replace the agent policy at run time.

The request is first decided by the current policy's SetPolicyRequest rule; a policy that
does not compile is refused (INVALID_ARGUMENT) and the current one stays.  Both steps run
inside kagent.policy.AgentPolicy.set_policy, in order with every other decision.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from kagent.policy import AgentPolicy
from kagent.protocols import agent_pb2


class PolicyService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: object) -> None:
        policy = getattr(agent, "policy", None)
        if not isinstance(policy, AgentPolicy):
            raise TypeError("PolicyService needs agent.policy, a kagent.policy.AgentPolicy")
        self.policy = policy

    async def SetPolicy(self, request: agent_pb2.SetPolicyRequest, ctx) -> empty_pb2.Empty:
        await self.policy.set_policy(request)
        return empty_pb2.Empty()
