"""Tracing (agent.trace / KATA_AGENT_TRACING): OpenTelemetry spans for RPCs and their steps.

    tracing.setup(vsock_address="vsock://2:10240")     # or file_path="/run/kagent-spans.jsonl"
    server = Server(routes, interceptors=[*tracing.interceptors()])
    ...
    with tracing.span("worker fork", container_id=cid):   # anywhere below an RPC
        ...
    tracing.shutdown()

- One span per RPC (the interceptor), named as upstream names them (``create_container``),
  kind SERVER, its parent taken from the W3C ``traceparent``/``tracestate`` entries of the
  ttRPC request metadata, so the host's spans and the guest's join in one trace.
- ``span(name, **attributes)`` opens a child of whatever span is current (contextvars follow
  the RPC's task); other modules call it for their main steps.
- Exporters: ``VsockSpanExporter`` — upstream's framing to the host trace forwarder (connect to
  CID 2 port 10240; each span an 8-byte big-endian length, then the span as JSON) — and
  ``JsonLinesSpanExporter`` (one JSON span per line in a file) for development.

Off costs nothing: OpenTelemetry is not even imported, ``interceptors()`` is empty (the RPC
path is exactly the untraced one) and ``span()`` returns one shared no-op context manager.
Exporting happens in the SDK's batch thread; a host that is not listening costs dropped
spans and a warning, never a stalled RPC.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from kagent import log as klog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

_log = klog.get_logger("tracing")

DEFAULT_ADDRESS = "vsock://2:10240"  # the host (CID 2), upstream's trace forwarder port
SERVICE_NAME = "kata-agent"
HEADER = struct.Struct(">Q")  # upstream's frame header: the payload length, u64 big-endian

_NOOP = contextlib.nullcontext()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_propagator: Any = None
_names: dict[str, str] = {}


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one around a step; a shared no-op when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return _NOOP
    return tracer.start_as_current_span(name, attributes=attributes or None)


def setup(*, vsock_address: str | None = DEFAULT_ADDRESS, file_path: str | None = None,
          exporters: Sequence[SpanExporter] = (), batch: bool = True) -> None:
    """Turn tracing on with the given exporters (vsock unless ``vsock_address`` is None, a
    JSON-lines file if ``file_path``, and any others).  Replaces an earlier set-up."""
    global _tracer, _provider, _propagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    shutdown()
    chosen: list[SpanExporter] = list(exporters)
    if vsock_address:
        chosen.append(VsockSpanExporter(vsock_address))
    if file_path:
        chosen.append(JsonLinesSpanExporter(file_path))
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                              shutdown_on_exit=False)
    for exporter in chosen:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _propagator = TraceContextTextMapPropagator()
    _provider = provider
    _tracer = provider.get_tracer("kagent")
    _log.info("tracing on", exporters=[type(e).__name__ for e in chosen],
              address=vsock_address, file=file_path)


def force_flush(timeout_millis: int = 5000) -> bool:
    return _provider.force_flush(timeout_millis) if _provider is not None else True


def shutdown() -> None:
    """Flush what is queued and turn tracing off (the agent calls it when it stops)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def interceptors() -> list[Callable[..., Awaitable[Any]]]:
    """The ttRPC interceptors tracing needs: none when it is off."""
    return [rpc_interceptor] if _tracer is not None else []


def record_steps(timings: Any) -> None:
    """Child spans of the current one for steps another process timed (the container worker
    and its init, which have no tracer): ``[[name, start_ns, end_ns], ...]``, wall clock."""
    tracer = _tracer
    if tracer is None or not isinstance(timings, list):
        return
    for item in timings:
        try:
            name, start, end = str(item[0]), int(item[1]), int(item[2])
        except (TypeError, ValueError, IndexError):
            continue  # a worker is ours, but its records are still only data
        tracer.start_span(name, start_time=start).end(end_time=end)


def rpc_name(method: str) -> str:
    """CreateContainer → create_container (upstream's span names)."""
    name = _names.get(method)
    if name is None:
        name = _names[method] = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", method).lower()
    return name


async def rpc_interceptor(ctx: Any, request: Any, call_next: Callable[[], Awaitable[Any]]) -> Any:
    tracer = _tracer
    if tracer is None:  # turned off while serving
        return await call_next()
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from kagent.ttrpc.status import status_of

    parent = None
    if ctx.metadata:
        carrier = {k.lower(): v for k, v in ctx.metadata.items()}
        parent = _propagator.extract(carrier)
    attributes: dict[str, Any] = {"rpc.system": "ttrpc", "rpc.service": ctx.service, "rpc.method": ctx.method}
    for field in ("container_id", "exec_id", "sandbox_id"):
        value = getattr(request, field, None)
        if value:
            attributes[field] = value
    with tracer.start_as_current_span(rpc_name(ctx.method), context=parent, kind=SpanKind.SERVER,
                                      attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as s:
        try:
            response = await call_next()
        except BaseException as exc:
            code, message, _ = status_of(exc)
            s.set_attribute("rpc.ttrpc.status_code", code.name)
            s.set_status(Status(StatusCode.ERROR, message))
            raise
        s.set_attribute("rpc.ttrpc.status_code", "OK")
        return response


# ---------------------------------------------------------------------------------------------
# Spans as JSON: shaped like upstream's SpanData (opentelemetry-rust), with readable ids.


def _time(ns: int | None) -> dict[str, int] | None:
    if ns is None:
        return None
    secs, nanos = divmod(ns, 1_000_000_000)
    return {"secs_since_epoch": secs, "nanos_since_epoch": nanos}


def _value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def span_to_dict(s: ReadableSpan) -> dict[str, Any]:
    ctx = s.get_span_context()
    assert ctx is not None
    kind = s.kind.name.capitalize()
    return {
        "span_context": {
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "trace_flags": int(ctx.trace_flags),
            "is_remote": ctx.is_remote,
            "trace_state": ctx.trace_state.to_header() if ctx.trace_state else "",
        },
        "parent_span_id": f"{s.parent.span_id:016x}" if s.parent is not None else f"{0:016x}",
        "span_kind": kind,
        "name": s.name,
        "start_time": _time(s.start_time),
        "end_time": _time(s.end_time),
        "attributes": {k: _value(v) for k, v in (s.attributes or {}).items()},
        "message_events": [{"name": e.name, "timestamp": _time(e.timestamp),
                            "attributes": {k: _value(v) for k, v in (e.attributes or {}).items()}}
                           for e in s.events],
        "links": [{"trace_id": f"{lk.context.trace_id:032x}", "span_id": f"{lk.context.span_id:016x}"}
                  for lk in s.links],
        "status_code": s.status.status_code.name.capitalize(),
        "status_message": s.status.description or "",
        "resource": {k: _value(v) for k, v in s.resource.attributes.items()},
        "instrumentation_lib": {"name": s.instrumentation_scope.name if s.instrumentation_scope else "",
                                "version": (s.instrumentation_scope.version or "") if s.instrumentation_scope else ""},
    }


def encode_span(s: ReadableSpan) -> bytes:
    return json.dumps(span_to_dict(s), separators=(",", ":"), default=str).encode()


# The exporters implement OpenTelemetry's SpanExporter interface (export, shutdown,
# force_flush) without subclassing it, so that importing this module never imports the SDK.


class VsockSpanExporter:
    """Spans to the host's trace forwarder: 8-byte big-endian length, then the JSON span.

    Connects on first use and again after an error; while the host is not listening, spans
    are dropped (the SDK counts a failed export) and a warning is logged once.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 5.0) -> None:
        from kagent.ttrpc.addresses import parse

        self.address = address
        self._addr = parse(address)
        if self._addr.scheme not in ("vsock", "unix"):
            raise ValueError(f"trace address must be vsock:// or unix://, not {address!r}")
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self.sent = 0

    def _connect(self) -> socket.socket:
        a = self._addr
        if a.scheme == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            target: Any = (a.cid, a.port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            target = a.path
        sock.settimeout(self.timeout)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return sock

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        frames = b"".join(HEADER.pack(len(p)) + p for p in map(encode_span, spans))
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = self._connect()
                    if self._warned:
                        _log.info("trace forwarder reachable again", address=self.address)
                    self._warned = False
                self._sock.sendall(frames)
            except OSError as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                (_log.debug if self._warned else _log.warning)(
                    "spans dropped: trace forwarder not reachable", address=self.address,
                    spans=len(spans), error=str(exc))
                self._warned = True
                return SpanExportResult.FAILURE
        self.sent += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)  # the forwarder reads EOF: "agent shut down"
                self._sock.close()
                self._sock = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class JsonLinesSpanExporter:
    """Spans appended to a file, one JSON object per line (for development: jq-friendly)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        data = b"".join(encode_span(s) + b"\n" for s in spans)
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                _log.warning("spans dropped: cannot write the trace file", path=self.path, error=str(exc))
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
