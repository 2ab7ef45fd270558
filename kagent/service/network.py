"""grpc.AgentService, network part: interfaces, routes, ARP neighbours, iptables.

Handlers decode, run the blocking kagent.network call in a worker thread
(netlink round trips and iptables children must not stall the event loop), and
shape the response.  The namespace configured is the one the agent runs in;
tests pass the namespace they created.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2

from kagent.errors import InvalidArgument
from kagent.iptables import IPTables
from kagent.network import Network
from kagent.protocols import agent_pb2, types_pb2

if TYPE_CHECKING:
    from kagent.agent import Agent

# (PCI path, timeout s) -> the interface name of the network device found there.
AsyncWaitForDevice = Callable[[str, float], Awaitable[str]]


class NetworkService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: Agent, netns: str | None = None,
                 wait_for_device: AsyncWaitForDevice | None = None) -> None:
        self.agent = agent
        self.network = Network(netns)
        self.iptables = IPTables(netns)
        # Supplied by the device layer (uevents); without it a devicePath is UNIMPLEMENTED.
        self.wait_for_device = wait_for_device

    async def UpdateInterface(self, request: agent_pb2.UpdateInterfaceRequest, ctx) -> types_pb2.Interface:
        if not request.HasField("interface"):
            raise InvalidArgument("UpdateInterface: the request has no interface")
        iface = request.interface
        timeout = float(self.agent.config.hotplug_timeout)
        waiter = None
        if iface.devicePath and self.wait_for_device is not None:
            # Wait on the loop (the uevent listener lives there), then hand the name over.
            ifname = await self.wait_for_device(iface.devicePath, timeout)
            waiter = lambda _path, _timeout: ifname  # noqa: E731
        return await asyncio.to_thread(self.network.update_interface, iface,
                                       wait_for_device=waiter, timeout=timeout)

    async def UpdateRoutes(self, request: agent_pb2.UpdateRoutesRequest, ctx) -> agent_pb2.Routes:
        if not request.HasField("routes"):
            raise InvalidArgument("UpdateRoutes: the request has no routes")
        return await asyncio.to_thread(self.network.update_routes, list(request.routes.Routes))

    async def ListInterfaces(self, request: agent_pb2.ListInterfacesRequest, ctx) -> agent_pb2.Interfaces:
        return await asyncio.to_thread(self.network.list_interfaces)

    async def ListRoutes(self, request: agent_pb2.ListRoutesRequest, ctx) -> agent_pb2.Routes:
        return await asyncio.to_thread(self.network.list_routes)

    async def AddARPNeighbors(self, request: agent_pb2.AddARPNeighborsRequest, ctx) -> empty_pb2.Empty:
        if not request.HasField("neighbors"):
            raise InvalidArgument("AddARPNeighbors: the request has no neighbors")
        await asyncio.to_thread(self.network.add_arp_neighbors, list(request.neighbors.ARPNeighbors))
        return empty_pb2.Empty()

    async def GetIPTables(self, request: agent_pb2.GetIPTablesRequest, ctx) -> agent_pb2.GetIPTablesResponse:
        data = await asyncio.to_thread(self.iptables.get, request.is_ipv6)
        return agent_pb2.GetIPTablesResponse(data=data)

    async def SetIPTables(self, request: agent_pb2.SetIPTablesRequest, ctx) -> agent_pb2.SetIPTablesResponse:
        data = await asyncio.to_thread(self.iptables.set, request.is_ipv6, request.data)
        return agent_pb2.SetIPTablesResponse(data=data)
