"""The RPC surface: thin handlers that map each RPC onto the agent's parts.

Every method of grpc.AgentService and grpc.Health is registered.  A method no
part implements yet answers UNIMPLEMENTED naming itself, never a fake success.
"""

from __future__ import annotations

from collections.abc import Iterable

from kagent import protocols
from kagent.errors import Unimplemented
from kagent.ttrpc.server import Context, Route


def _unimplemented(method: protocols.Method):
    async def handler(request, ctx: Context):
        raise Unimplemented(f"{method.service}/{method.name} is not implemented by kagent yet")

    handler.__name__ = f"unimplemented_{method.name}"
    return handler


def build_routes(services: Iterable[object]) -> dict[tuple[str, str], Route]:
    """Routes for every known method, taken from the objects that implement them.

    Each service object names its wire service in ``SERVICE`` and implements a
    method as an ``async def <RpcName>(self, request, ctx)``.
    """
    impls: dict[str, object] = {}
    for svc in services:
        impls[svc.SERVICE] = svc  # type: ignore[attr-defined]
    routes: dict[tuple[str, str], Route] = {}
    for key, method in protocols.methods().items():
        impl = impls.get(method.service)
        handler = getattr(impl, method.name, None) if impl is not None else None
        routes[key] = Route(method.request, handler or _unimplemented(method))
    return routes


def implemented(routes: dict[tuple[str, str], Route]) -> list[str]:
    return sorted(m for (_, m), r in routes.items() if not r.handler.__name__.startswith("unimplemented_"))
