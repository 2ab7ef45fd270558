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

    Each object names its wire service in ``SERVICE`` and implements methods as
    ``async def <RpcName>(self, request, ctx)``.  Several objects may serve one
    wire service (one per area of the API); a method implemented twice is a
    programming error.
    """
    impls: dict[str, list[object]] = {}
    for svc in services:
        impls.setdefault(svc.SERVICE, []).append(svc)  # type: ignore[attr-defined]
    routes: dict[tuple[str, str], Route] = {}
    for key, method in protocols.methods().items():
        handlers = [getattr(o, method.name) for o in impls.get(method.service, ()) if hasattr(o, method.name)]
        if len(handlers) > 1:
            raise RuntimeError(f"{method.service}/{method.name} is implemented {len(handlers)} times")
        routes[key] = Route(method.request, handlers[0] if handlers else _unimplemented(method))
    return routes


def implemented(routes: dict[tuple[str, str], Route]) -> list[str]:
    return sorted(m for (_, m), r in routes.items() if not r.handler.__name__.startswith("unimplemented_"))
