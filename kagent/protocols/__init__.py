"""Wire protocol of the kata agent: generated protobuf modules and a method registry.

The ``*_pb2`` modules are generated from the ``.proto`` files beside this one
(``setup.py build_protos``). The registry below is derived from the service
descriptors, so the .proto files stay the single source of truth for which
methods exist and which message types they take and return.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from . import agent_pb2, csi_pb2, health_pb2, oci_pb2, ttrpc_pb2, types_pb2

__all__ = [
    "Method",
    "methods",
    "find",
    "SERVICES",
    "agent_pb2",
    "csi_pb2",
    "health_pb2",
    "oci_pb2",
    "ttrpc_pb2",
    "types_pb2",
]


class Method(NamedTuple):
    service: str  # full wire name, e.g. "grpc.AgentService"
    name: str  # e.g. "CreateContainer"
    request: type[Message]
    response: type[Message]


_SERVICE_DESCRIPTORS: tuple[ServiceDescriptor, ...] = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
)

# Full wire names of the served services, e.g. ("grpc.AgentService", "grpc.Health").
SERVICES: tuple[str, ...] = tuple(s.full_name for s in _SERVICE_DESCRIPTORS)


def _build() -> tuple[dict[tuple[str, str], Method], dict[str, Method]]:
    by_key: dict[tuple[str, str], Method] = {}
    by_name: dict[str, Method] = {}
    for service in _SERVICE_DESCRIPTORS:
        for md in service.methods:
            method = Method(
                service=service.full_name,
                name=md.name,
                request=GetMessageClass(md.input_type),
                response=GetMessageClass(md.output_type),
            )
            by_key[(method.service, method.name)] = method
            if md.name in by_name:
                # find() relies on bare names being unique across services.
                raise RuntimeError(f"method name {md.name!r} is defined by more than one service")
            by_name[md.name] = method
    return by_key, by_name


_BY_KEY, _BY_NAME = _build()


def methods() -> dict[tuple[str, str], Method]:
    """All served methods, keyed by (service wire name, method name). Returns a copy."""
    return dict(_BY_KEY)


def find(name: str) -> Method:
    """The method called ``name`` (bare, e.g. "WaitProcess"); KeyError if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown agent method {name!r}") from None
