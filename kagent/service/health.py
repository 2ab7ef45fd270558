"""grpc.Health: the host runtime's first call, polled for the pod's life."""

from __future__ import annotations

from kagent import __version__
from kagent.protocols import health_pb2

API_VERSION = "0.0.1"  # upstream's ttRPC API version string


# One reply for every Check (polled for the pod's life): the server only serializes it.
_SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class HealthService:
    SERVICE = "grpc.Health"

    async def Check(self, request: health_pb2.CheckRequest, ctx) -> health_pb2.HealthCheckResponse:
        return _SERVING

    async def Version(self, request: health_pb2.CheckRequest, ctx) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=__version__)
