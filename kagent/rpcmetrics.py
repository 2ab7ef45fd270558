"""kagent's own metrics, and the HTTP endpoint that serves every metric (agent.metrics_addr).

On the registry of ``kagent.metrics.AgentMetrics`` (so GetMetrics returns them too):

  kagent_rpc_duration_seconds{rpc}        histogram  time to serve each ttRPC request
  kagent_rpc_requests_total{rpc,code}     counter    requests served, by status code name
  kagent_rpc_in_flight{rpc}               gauge      requests being served now
  kagent_container_create_seconds         histogram  successful CreateContainer (worker fork → ready)
  kagent_container_start_seconds          histogram  successful StartContainer
  kagent_exec_seconds                     histogram  successful ExecProcess
  kagent_container_workers                gauge      live container workers (one per container)
  kagent_uevents_total{action}            counter    kernel uevents by action (add, remove, ...)
  kagent_oom_events_total                 counter    OOM kills seen in containers

The RPC families come from the server's observer hooks (``RpcMetrics.begin``/``end``: no
coroutine layer on the RPC path), which keep plain
numbers that a collector turns into families at scrape time; the start-latency families are the
same measurement for the RPCs that start things, kept the same way; workers, uevents and OOM
kills are read from the agent's own state at scrape time (``AgentStateCollector``), so the hot
paths that produce them only bump an integer.  prometheus-client is imported by the code that
runs at scrape time only (as in kagent.metrics): start-up does not pay for it.

``MetricsEndpoint`` serves ``GET /metrics`` for scraping through a forwarded port: an asyncio
server on the agent's loop (no thread, no fork), the text rendered in a worker thread (the
collectors read /proc), Prometheus text 0.0.4 or OpenMetrics by the Accept header.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kagent import log as klog
from kagent.metrics import created_series
from kagent.ttrpc.codes import Code

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kagent.metrics import AgentMetrics

_log = klog.get_logger("metrics")

RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
# RPCs whose successful latency is also a "how long does it take to start X" family:
# RPC → (family, HELP), in the order the families are exposed.
_STARTS = {
    "CreateContainer": ("kagent_container_create_seconds",
                        "Time of successful CreateContainer calls (worker fork to container ready)."),
    "StartContainer": ("kagent_container_start_seconds", "Time of successful StartContainer calls."),
    "ExecProcess": ("kagent_exec_seconds", "Time of successful ExecProcess calls."),
}


@functools.cache
def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    from prometheus_client.utils import floatToGoString

    return tuple(floatToGoString(b) for b in bounds)


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    out, acc = [], 0
    for bound, n in zip(_le_labels(bounds), counts, strict=True):
        acc += n
        out.append((bound, acc))
    return out


_CODE_NAMES = {code: code.name for code in Code}


class _RpcStats:
    """One RPC's numbers, kept as plain ints and floats: the observer runs on every call
    (ReadStdout and WriteStdin included), and prometheus-client's metric objects cost several
    lock round trips and calls per observation; these are turned into families at scrape time."""

    __slots__ = ("buckets", "sum", "in_flight", "codes")

    def __init__(self) -> None:
        self.buckets = [0] * len(RPC_BUCKETS)  # per bucket, not cumulative
        self.sum = 0.0
        self.in_flight = 0
        self.codes: dict[str, int] = {}


class _StartStats:
    """A start-latency histogram (successful calls of one RPC), kept as _RpcStats is."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(START_BUCKETS)  # per bucket, not cumulative
        self.sum = 0.0


class RpcMetrics:
    """The RPC families, and the ttRPC server observer that fills them."""

    def __init__(self, metrics: AgentMetrics, agent: Any | None = None) -> None:
        self._stats: dict[str, _RpcStats] = {}
        self._starts = {rpc: _StartStats() for rpc in _STARTS}
        self.created = time.time()  # the start families' _created (as prometheus-client's Histogram)
        # Held for a few additions per call, and by a scrape while it copies the numbers:
        # a scrape never sees a call half counted.
        self._lock = threading.Lock()
        metrics.register(_RpcCollector(self))
        if agent is not None:
            metrics.register(AgentStateCollector(agent))

    def _new(self, rpc: str) -> _RpcStats:
        stats = self._stats[rpc] = _RpcStats()
        return stats

    # -- the server's observer (kagent.ttrpc.server.Observer) --------------------------------

    def begin(self, ctx: Any) -> None:
        stats = self._stats.get(ctx.method) or self._new(ctx.method)
        # No lock: begin and end both run on the event loop (they never interleave), and a
        # scrape reads this one int whole; end's several updates are what the lock keeps together.
        stats.in_flight += 1

    def end(self, ctx: Any, code: Code) -> None:
        rpc = ctx.method
        elapsed = time.perf_counter() - ctx.started
        stats = self._stats[rpc]
        name = _CODE_NAMES[code]  # Enum.name is a property lookup: ~3% of a Check
        start = self._starts.get(rpc) if code is Code.OK else None
        with self._lock:
            stats.in_flight -= 1
            stats.buckets[bisect.bisect_left(RPC_BUCKETS, elapsed)] += 1
            stats.sum += elapsed
            stats.codes[name] = stats.codes.get(name, 0) + 1
            if start is not None:
                start.buckets[bisect.bisect_left(START_BUCKETS, elapsed)] += 1
                start.sum += elapsed

    def snapshot(self) -> list[tuple[str, list[int], float, int, dict[str, int]]]:
        with self._lock:
            return [(rpc, list(s.buckets), s.sum, s.in_flight, dict(s.codes))
                    for rpc, s in sorted(self._stats.items())]

    def starts_snapshot(self) -> list[tuple[str, list[int], float]]:
        """(RPC, per-bucket counts, sum) of each start-latency family, in _STARTS' order."""
        with self._lock:
            return [(rpc, list(s.buckets), s.sum) for rpc, s in self._starts.items()]


class _RpcCollector:
    def __init__(self, rpc: RpcMetrics) -> None:
        self.rpc = rpc

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        created = created_series()
        for rpc, buckets, total in self.rpc.starts_snapshot():
            name, doc = _STARTS[rpc]
            family = HistogramMetricFamily(name, doc, _cumulative(START_BUCKETS, buckets), total)
            if created:  # a prometheus-client Histogram has one; kagent.metrics.encode drops it
                family.add_sample(name + "_created", {}, self.rpc.created)
            yield family
        duration = HistogramMetricFamily("kagent_rpc_duration_seconds",
                                         "Time to serve a ttRPC request, by RPC.", labels=["rpc"])
        requests = CounterMetricFamily("kagent_rpc_requests", "ttRPC requests served, by RPC and status code.",
                                       labels=["rpc", "code"])
        in_flight = GaugeMetricFamily("kagent_rpc_in_flight", "ttRPC requests being served, by RPC.",
                                      labels=["rpc"])
        for rpc, buckets, total, running, codes in self.rpc.snapshot():
            duration.add_metric([rpc], _cumulative(RPC_BUCKETS, buckets), total)
            in_flight.add_metric([rpc], running)
            for code, n in sorted(codes.items()):
                requests.add_metric([rpc, code], n)
        yield duration
        yield requests
        yield in_flight


class AgentStateCollector:
    """Families read from the agent's state at scrape time (a scrape runs in a thread: only
    len() of dicts and reads of ints, which the GIL keeps whole)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        sandbox = getattr(self.agent, "sandbox", None)
        containers = getattr(sandbox, "containers", None) if sandbox is not None else None
        yield GaugeMetricFamily("kagent_container_workers", "Live container worker processes.",
                                value=len(containers) if containers is not None else 0)
        actions = getattr(getattr(self.agent, "devices", None), "events_by_action", None)
        if actions is not None:
            fam = CounterMetricFamily("kagent_uevents", "Kernel uevents received, by action.", labels=["action"])
            for action, count in sorted(dict(actions).items()):
                fam.add_metric([str(action)], count)
            yield fam
        kills = getattr(getattr(self.agent, "oom_events", None), "kills", None)
        if kills is not None:
            yield CounterMetricFamily("kagent_oom_events", "OOM kills seen in containers.", value=kills)
        from kagent import stdio  # loaded with the agent's services; imported here for its counters

        moved = CounterMetricFamily("kagent_stdio_bytes", "Container stdio bytes moved, by direction "
                                    "(out: to the host, in: from it) and path (copy or splice).",
                                    labels=["direction", "path"])
        for (direction, path), count in sorted(dict(stdio.BYTES).items()):
            moved.add_metric([direction, path], count)
        yield moved


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint.

MAX_REQUEST_HEAD = 16 << 10
REQUEST_TIMEOUT = 10.0
_HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):([0-9]{1,5})")


def parse_metrics_addr(text: str) -> tuple[str, str | None, int] | str:
    """``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` → ("tcp", host or None, port); a URI
    (``unix:///path``, ``vsock://-1:PORT``) is returned as it is. ValueError if invalid."""
    if "://" in text:
        from kagent.ttrpc.addresses import parse

        addr = parse(text)
        if addr.scheme not in ("unix", "vsock"):
            raise ValueError(f"metrics address {text!r}: use HOST:PORT, unix:// or vsock://")
        return text
    m = _HOST_PORT.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT")
    port = int(m.group(3))
    if port > 65535:
        raise ValueError(f"metrics address {text!r}: port out of range")
    host = m.group(1) or m.group(2) or None
    return ("tcp", host, port)


class _HttpConnection(asyncio.Protocol):
    """One request, one response, then close (HTTP/1.0-style, which every scraper accepts)."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.endpoint._connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end > MAX_REQUEST_HEAD or (end < 0 and len(self.buf) > MAX_REQUEST_HEAD):
            self._reply(431, b"request header too large\n")
            return
        if end < 0:
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._serve(bytes(self.buf[:end])))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.endpoint._connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _serve(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._reply(400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            self._reply(405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
            return
        if target.split("?", 1)[0] != "/metrics":
            self._reply(404, b"not found: the metrics are at /metrics\n")
            return
        try:
            body, content_type = await self.endpoint.render(headers.get("accept", ""))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.error("metrics scrape failed", error=f"{type(exc).__name__}: {exc}")
            self._reply(500, b"scrape failed\n")
            return
        self._reply(200, body, content_type=content_type, head_only=method == "HEAD")

    def _reply(self, status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
               extra: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> None:
        if self.transport is None:
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error"}[status]
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in extra)]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        self.transport.close()


class MetricsEndpoint:
    """``GET /metrics`` on HOST:PORT (or unix://, vsock://) for a Prometheus scraper."""

    def __init__(self, metrics: AgentMetrics, address: str) -> None:
        self.metrics = metrics
        self.address = address
        self._target = parse_metrics_addr(address)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_HttpConnection] = set()
        self._lock: asyncio.Lock | None = None
        self._socket_file: str | None = None
        self.scrapes = 0

    async def start(self) -> None:
        """Listen; OSError/ValueError when the address cannot be served."""
        loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        target = self._target
        if isinstance(target, tuple):
            _, host, port = target
            self._server = await loop.create_server(lambda: _HttpConnection(self), host, port,
                                                    reuse_address=True)
        else:
            from kagent.ttrpc.addresses import parse
            from kagent.ttrpc.transports import listen

            addr = parse(target)
            self._server = await listen(addr, lambda: _HttpConnection(self))
            if addr.scheme == "unix" and not addr.abstract:
                self._socket_file = addr.path
        _log.info("metrics endpoint listening", address=self.address, url_path="/metrics")

    @property
    def port(self) -> int | None:
        """The TCP port bound (useful with port 0)."""
        if self._server is None:
            return None
        for sock in self._server.sockets:
            name = sock.getsockname()
            if isinstance(name, tuple):
                return int(name[1])
        return None

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for this Accept header, built in a thread, one scrape at a time."""
        assert self._lock is not None
        async with self._lock:
            body, content_type = await asyncio.to_thread(self._render, accept)
        self.scrapes += 1
        return body, content_type

    def _render(self, accept: str) -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.metrics.registry), content_type

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._socket_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_file)
            self._socket_file = None
        await asyncio.sleep(0)  # let the closed connections finish
