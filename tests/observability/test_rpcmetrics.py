"""kagent's own metrics: the RPC observer's families, the state read at scrape time, and the
HTTP endpoint (Prometheus text and OpenMetrics), parsed with prometheus-client's parsers."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from kagent import protocols
from kagent.errors import NotFound
from kagent.metrics import AgentMetrics, encode
from kagent.rpcmetrics import MetricsEndpoint, RpcMetrics, parse_metrics_addr
from kagent.service import build_routes
from kagent.service.health import HealthService
from kagent.ttrpc.client import Client
from kagent.ttrpc.server import Server
from kagent.ttrpc.status import RpcError


class Svc:
    SERVICE = "grpc.AgentService"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def CreateContainer(self, request, ctx):
        return protocols.find("CreateContainer").response()

    async def StartContainer(self, request, ctx):
        await self.gate.wait()
        return protocols.find("StartContainer").response()

    async def RemoveContainer(self, request, ctx):
        raise NotFound("no such container")

    async def ExecProcess(self, request, ctx):
        await asyncio.sleep(5)  # past the caller's deadline
        return protocols.find("ExecProcess").response()


def _state():
    # The agent's state as the collector reads it. A stand-in: a real sandbox with containers
    # needs the whole agent (tests/observability/test_agent_integration.py runs that).
    return SimpleNamespace(sandbox=SimpleNamespace(containers={"a": 1, "b": 2}),
                           devices=SimpleNamespace(events_by_action={"add": 3, "remove": 1}),
                           oom_events=SimpleNamespace(kills=0))


class Rig:
    async def start(self, tmp_sock_dir: str) -> Rig:
        self.state = _state()
        self.metrics = AgentMetrics()
        self.rpc = RpcMetrics(self.metrics, self.state)
        self.svc = Svc()
        self.server = Server(build_routes([HealthService(), self.svc]), observers=[self.rpc])
        addr = "unix://" + os.path.join(tmp_sock_dir, "agent.sock")
        await self.server.start(addr)
        self.client = await Client.connect(addr)
        self.endpoint = MetricsEndpoint(self.metrics, "127.0.0.1:0")
        await self.endpoint.start()
        return self

    async def call(self, name: str, timeout: float = 10, **fields):
        m = protocols.find(name)
        return await self.client.call(m.service, m.name, m.request(**fields), m.response, timeout=timeout)

    async def http(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.endpoint.port)
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, body

    async def scrape(self, accept: str = "") -> dict[tuple[str, tuple], float]:
        req = b"GET /metrics HTTP/1.1\r\nHost: guest\r\n" + (f"Accept: {accept}\r\n".encode() if accept else b"")
        status, headers, body = await self.http(req + b"\r\n")
        assert status == 200, body
        assert int(headers["Content-Length"]) == len(body)
        parse = parse_openmetrics if "openmetrics" in headers["Content-Type"] else parse_text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in parse(body.decode()) for s in fam.samples}

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()
        await self.endpoint.close()


def with_rig(fn):
    """The test runs against a started Rig (async fixtures are not a thing in this suite)."""
    async def test(tmp_sock_dir):
        r = await Rig().start(tmp_sock_dir)
        try:
            await fn(r)
        finally:
            await r.close()

    test.__name__, test.__doc__ = fn.__name__, fn.__doc__
    return test


def _v(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_rpc_counts_latency_and_codes_move(tmp_sock_dir):
    r = await Rig().start(tmp_sock_dir)
    try:
        before = await r.scrape()
        for _ in range(3):
            await r.call("Check")
        await r.call("CreateContainer", container_id="c1")
        with pytest.raises(RpcError):
            await r.call("RemoveContainer", container_id="c1")
        with pytest.raises(RpcError):
            await r.call("ExecProcess", timeout=0.05, container_id="c1", exec_id="e1")
        # The client's own timer may fire before the agent's: wait for the agent to give up too.
        async with asyncio.timeout(5):
            while _v(after := await r.scrape(), "kagent_rpc_in_flight", rpc="ExecProcess") != 0:
                await asyncio.sleep(0.01)
    finally:
        await r.close()
    assert _v(after, "kagent_rpc_requests_total", rpc="Check", code="OK") - \
        _v(before, "kagent_rpc_requests_total", rpc="Check", code="OK") == 3
    assert _v(after, "kagent_rpc_requests_total", rpc="RemoveContainer", code="NOT_FOUND") == 1
    assert _v(after, "kagent_rpc_requests_total", rpc="ExecProcess", code="DEADLINE_EXCEEDED") == 1
    assert _v(after, "kagent_rpc_duration_seconds_count", rpc="Check") == 3
    assert _v(after, "kagent_rpc_duration_seconds_bucket", rpc="Check", le="+Inf") == 3
    assert 0 < _v(after, "kagent_rpc_duration_seconds_sum", rpc="Check") < 3
    assert _v(after, "kagent_rpc_duration_seconds_sum", rpc="ExecProcess") >= 0.04
    # Start latencies count successes only.
    assert _v(after, "kagent_container_create_seconds_count") == 1
    assert _v(after, "kagent_exec_seconds_count") == 0
    # The upstream families are on the same registry.
    assert _v(after, "kata_agent_threads") >= 1
    assert any(name == "kata_guest_meminfo" for name, _ in after)


@with_rig
async def test_in_flight_gauge_and_start_latency(rig):
    task = asyncio.create_task(rig.call("StartContainer", container_id="c1"))
    await asyncio.sleep(0.05)
    during = await rig.scrape()
    assert _v(during, "kagent_rpc_in_flight", rpc="StartContainer") == 1
    assert _v(during, "kagent_container_start_seconds_count") == 0
    rig.svc.gate.set()
    await task
    after = await rig.scrape()
    assert _v(after, "kagent_rpc_in_flight", rpc="StartContainer") == 0
    assert _v(after, "kagent_container_start_seconds_count") == 1
    assert _v(after, "kagent_container_start_seconds_sum") >= 0.04


@with_rig
async def test_agent_state_is_read_at_each_scrape(rig):
    first = await rig.scrape()
    assert _v(first, "kagent_container_workers") == 2
    assert _v(first, "kagent_uevents_total", action="add") == 3
    assert _v(first, "kagent_oom_events_total") == 0
    rig.state.sandbox.containers["c"] = 3
    rig.state.devices.events_by_action["add"] += 2
    rig.state.devices.events_by_action["change"] = 1
    rig.state.oom_events.kills += 1
    second = await rig.scrape()
    assert _v(second, "kagent_container_workers") == 3
    assert _v(second, "kagent_uevents_total", action="add") == 5
    assert _v(second, "kagent_uevents_total", action="change") == 1
    assert _v(second, "kagent_oom_events_total") == 1
    # An agent part without the counters (older or not started) costs its family, not the scrape.
    rig.state.devices = None
    rig.state.sandbox = None
    third = await rig.scrape()
    assert _v(third, "kagent_container_workers") == 0
    assert not any(name.startswith("kagent_uevents") for name, _ in third)


@with_rig
async def test_openmetrics_by_accept_header(rig):
    await rig.call("Check")
    status, headers, body = await rig.http(
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0,text/plain;q=0.5\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    assert families["kagent_rpc_requests"].type == "counter"
    assert families["kagent_rpc_duration_seconds"].type == "histogram"
    assert {s.labels["rpc"] for s in families["kagent_rpc_duration_seconds"].samples} >= {"Check"}
    status, headers, body = await rig.http(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE kagent_rpc_requests_total counter" in body


@with_rig
async def test_http_errors_and_head(rig):
    status, _, body = await rig.http(b"GET / HTTP/1.1\r\n\r\n")
    assert status == 404 and b"/metrics" in body
    status, headers, _ = await rig.http(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, _ = await rig.http(b"nonsense\r\n\r\n")
    assert status == 400
    status, _, _ = await rig.http(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (20 << 10) + b"\r\n\r\n")
    assert status == 431
    status, headers, body = await rig.http(b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


@with_rig
async def test_a_slow_scrape_does_not_hold_up_rpcs(rig):
    class Slow:
        def collect(self):
            time.sleep(0.5)  # a collector stuck on a slow /proc or statfs
            return iter(())

    rig.metrics.register(Slow())
    scrape = asyncio.create_task(rig.scrape())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await rig.call("Check")
    assert time.perf_counter() - started < 0.25
    assert not scrape.done()
    await scrape


@with_rig
async def test_getmetrics_text_carries_the_new_families_and_parses(rig):
    await rig.call("Check")
    text = await rig.metrics.gather()
    names = {f.name for f in parse_text(text)}
    assert {"kagent_rpc_requests", "kagent_rpc_duration_seconds", "kata_agent_scrape_count"} <= names
    assert "kagent_rpc_requests{" in text  # upstream's counter naming: no _total in GetMetrics
    assert encode(rig.metrics.registry).count("# TYPE kagent_rpc_duration_seconds histogram") == 1


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:8090", ("tcp", "127.0.0.1", 8090)),
    ("0.0.0.0:9100", ("tcp", "0.0.0.0", 9100)),
    (":9100", ("tcp", None, 9100)),
    ("[::1]:9100", ("tcp", "::1", 9100)),
    ("localhost:1", ("tcp", "localhost", 1)),
    ("vsock://-1:9100", "vsock://-1:9100"),
    ("unix:///run/kagent-metrics.sock", "unix:///run/kagent-metrics.sock"),
])
def test_metrics_addr_parsing(text, parsed):
    assert parse_metrics_addr(text) == parsed


@pytest.mark.parametrize("text", ["9100", "host:", "host:99999", "a:b:c", "hvsock:///x:1", "[::1]"])
def test_metrics_addr_rejected(text):
    with pytest.raises(ValueError):
        parse_metrics_addr(text)


async def test_endpoint_on_a_unix_socket(tmp_sock_dir):
    metrics = AgentMetrics()
    path = os.path.join(tmp_sock_dir, "metrics.sock")
    ep = MetricsEndpoint(metrics, "unix://" + path)
    await ep.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 OK") and b"kata_agent_threads" in data
    finally:
        await ep.close()
    assert not os.path.exists(path)
