"""Tracing: a span per RPC (parent from the W3C traceparent in the ttRPC metadata), child spans
for steps, upstream's vsock framing and the JSON-lines file, and nothing at all when off."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time

import pytest

from kagent import protocols, tracing
from kagent.errors import NotFound
from kagent.service import build_routes
from kagent.ttrpc.client import Client
from kagent.ttrpc.server import Server
from kagent.ttrpc.status import RpcError

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Svc:
    """Stands in for the container service: the steps it traces are the real helper's."""

    SERVICE = "grpc.AgentService"

    async def CreateContainer(self, request, ctx):
        with tracing.span("worker fork", container_id=request.container_id):
            await asyncio.sleep(0.001)
        with tracing.span("rootfs set-up"):
            with tracing.span("storage mount", driver="virtio-blk"):
                pass
        return protocols.find("CreateContainer").response()

    async def RemoveContainer(self, request, ctx):
        raise NotFound(f"container {request.container_id!r} not found")


@pytest.fixture
def off():
    tracing.shutdown()
    yield
    tracing.shutdown()


@pytest.fixture
def spans_file(tmp_path):
    path = str(tmp_path / "spans.jsonl")
    tracing.setup(vsock_address=None, file_path=path, batch=False)
    try:
        yield path
    finally:
        tracing.shutdown()


async def _serve(tmp_sock_dir) -> tuple[Server, Client]:
    server = Server(build_routes([Svc()]), interceptors=tracing.interceptors())
    addr = "unix://" + os.path.join(tmp_sock_dir, "agent.sock")
    await server.start(addr)
    return server, await Client.connect(addr)


async def _call(client, name, metadata=None, **fields):
    m = protocols.find(name)
    return await client.call(m.service, m.name, m.request(**fields), m.response, timeout=10, metadata=metadata)


def _read_spans(path: str) -> list[dict]:
    tracing.force_flush()
    with open(path) as f:
        return [json.loads(line) for line in f]


async def test_rpc_span_joins_the_callers_trace_and_steps_are_children(spans_file, tmp_sock_dir):
    server, client = await _serve(tmp_sock_dir)
    try:
        await _call(client, "CreateContainer", metadata={"traceparent": TRACEPARENT}, container_id="c1")
    finally:
        await client.close()
        await server.close()
    spans = {s["name"]: s for s in _read_spans(spans_file)}
    assert set(spans) == {"create_container", "worker fork", "rootfs set-up", "storage mount"}
    rpc = spans["create_container"]
    assert rpc["span_context"]["trace_id"] == TRACE_ID
    assert rpc["parent_span_id"] == PARENT_ID  # the host's span
    assert rpc["span_kind"] == "Server"
    assert rpc["attributes"]["rpc.method"] == "CreateContainer"
    assert rpc["attributes"]["container_id"] == "c1"
    assert rpc["attributes"]["rpc.ttrpc.status_code"] == "OK"
    assert rpc["resource"]["service.name"] == "kata-agent"
    rpc_id = rpc["span_context"]["span_id"]
    for name in ("worker fork", "rootfs set-up"):
        assert spans[name]["parent_span_id"] == rpc_id
        assert spans[name]["span_context"]["trace_id"] == TRACE_ID
    assert spans["storage mount"]["parent_span_id"] == spans["rootfs set-up"]["span_context"]["span_id"]
    assert spans["worker fork"]["attributes"] == {"container_id": "c1"}
    start, end = rpc["start_time"], rpc["end_time"]
    assert (end["secs_since_epoch"], end["nanos_since_epoch"]) >= (start["secs_since_epoch"], start["nanos_since_epoch"])


async def test_rpc_without_metadata_starts_a_trace_and_errors_are_marked(spans_file, tmp_sock_dir):
    server, client = await _serve(tmp_sock_dir)
    try:
        await _call(client, "CreateContainer", container_id="c2")
        with pytest.raises(RpcError):
            await _call(client, "RemoveContainer", container_id="nope")
        # A malformed traceparent is ignored: a new trace, not a failed RPC.
        await _call(client, "CreateContainer", metadata={"traceparent": "garbage"}, container_id="c3")
    finally:
        await client.close()
        await server.close()
    spans = _read_spans(spans_file)
    roots = [s for s in spans if s["name"] in ("create_container", "remove_container")]
    assert len(roots) == 3
    assert all(s["parent_span_id"] == "0" * 16 for s in roots)
    assert len({s["span_context"]["trace_id"] for s in roots}) == 3
    failed = next(s for s in roots if s["name"] == "remove_container")
    assert failed["status_code"] == "Error"
    assert failed["attributes"]["rpc.ttrpc.status_code"] == "NOT_FOUND"
    assert "not found" in failed["status_message"]


def _frame_reader(srv: socket.socket, frames: list[dict], done: threading.Event) -> threading.Thread:
    def run():
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as f:
            while header := f.read(8):
                (n,) = struct.unpack(">Q", header)
                frames.append(json.loads(f.read(n)))
        done.set()  # EOF: the agent shut the exporter down
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def test_vsock_exporter_frames_spans_for_the_trace_forwarder(tmp_sock_dir):
    path = os.path.join(tmp_sock_dir, "forwarder.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    frames: list[dict] = []
    done = threading.Event()
    t = _frame_reader(srv, frames, done)
    tracing.setup(vsock_address="unix://" + path)  # batch processor, as in the agent
    try:
        server, client = await _serve(tmp_sock_dir)
        try:
            for i in range(3):
                await _call(client, "CreateContainer", metadata={"traceparent": TRACEPARENT}, container_id=f"c{i}")
        finally:
            await client.close()
            await server.close()
    finally:
        await asyncio.to_thread(tracing.shutdown)  # flush, then EOF to the forwarder
    assert await asyncio.to_thread(done.wait, 5)
    t.join(1)
    srv.close()
    assert len(frames) == 12
    assert sum(f["name"] == "create_container" for f in frames) == 3
    assert all(f["span_context"]["trace_id"] == TRACE_ID for f in frames)


def test_vsock_exporter_drops_while_nobody_listens_and_reconnects(tmp_sock_dir):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult

    path = os.path.join(tmp_sock_dir, "late.sock")
    exporter = tracing.VsockSpanExporter("unix://" + path, timeout=1)
    provider = TracerProvider(shutdown_on_exit=False)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("lost") as s:
        pass
    started = time.monotonic()
    assert exporter.export([s]) == SpanExportResult.FAILURE  # nobody there: dropped, quickly
    assert time.monotonic() - started < 1
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    frames: list[dict] = []
    done = threading.Event()
    t = _frame_reader(srv, frames, done)
    with tracer.start_as_current_span("delivered") as s2:
        pass
    assert exporter.export([s2]) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert done.wait(5)
    t.join(1)
    srv.close()
    assert [f["name"] for f in frames] == ["delivered"]


def test_vsock_exporter_refuses_other_schemes():
    with pytest.raises(ValueError):
        tracing.VsockSpanExporter("serial:///dev/vport0p1")


async def test_off_means_no_interceptor_and_a_shared_noop(off, tmp_sock_dir):
    assert not tracing.enabled()
    assert tracing.interceptors() == []
    a, b = tracing.span("worker fork", container_id="x"), tracing.span("cgroup apply")
    assert a is b  # one shared no-op: nothing allocated, nothing recorded
    with a as value:
        assert value is None
    # Per call, off costs a function call and a global load; generous bound for a busy machine.
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        with tracing.span("step"):
            pass
    per_call = (time.perf_counter() - started) / n
    assert per_call < 5e-6, f"{per_call * 1e9:.0f} ns per span() when off"
    server, client = await _serve(tmp_sock_dir)
    try:
        assert server.interceptors == []  # the RPC path is exactly the untraced one
        await _call(client, "CreateContainer", metadata={"traceparent": TRACEPARENT}, container_id="c")
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(("method", "name"), [
    ("CreateContainer", "create_container"), ("GetOOMEvent", "get_oom_event"),
    ("OnlineCPUMem", "online_cpu_mem"), ("Check", "check"), ("AddARPNeighbors", "add_arp_neighbors"),
])
def test_rpc_span_names_follow_upstream(method, name):
    assert tracing.rpc_name(method) == name
