"""The observability options on a real kagent process: debug console, log forwarding, tracing,
the metrics endpoint and GetMetrics, and a container start moving the counters.

These need the agent wired up (config options agent.debug_console_addr, agent.log_addr,
agent.metrics_addr, agent.trace_file; see docs/observability.md): until then they skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import uuid

import pytest
from obs_harness import HELLO, ConsoleClient, wait_gone
from prometheus_client.parser import text_string_to_metric_families as parse_text

from kagent import devtools, protocols
from kagent.config import AgentConfig

NEEDED = {"debug_console_addr", "log_addr", "metrics_addr", "trace_file"}
_fields = {f.name for f in dataclasses.fields(AgentConfig)}
pytestmark = pytest.mark.skipif(not NEEDED <= _fields,
                                reason=f"agent not wired for observability yet (missing {sorted(NEEDED - _fields)})")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Setup:
    def __init__(self) -> None:
        from containers.e2e import Agent  # tests/ is on sys.path

        self.dir = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
        self.console = os.path.join(self.dir, "console.sock")
        self.logs = os.path.join(self.dir, "log.sock")
        self.spans_path = os.path.join(self.dir, "spans.jsonl")
        self.port = _free_port()
        cmdline = (f"quiet agent.debug_console agent.debug_console_addr=unix://{self.console} "
                   f"agent.log_addr=unix://{self.logs} agent.metrics_addr=127.0.0.1:{self.port} "
                   f"agent.trace agent.trace_file={self.spans_path}")
        self.agent = Agent(self.dir, cmdline=cmdline)

    async def ready(self) -> None:
        async with asyncio.timeout(30):
            while not all(os.path.exists(p) for p in (self.agent.sock, self.console, self.logs)):
                assert self.agent.proc.poll() is None, self.agent.log()[-3000:]
                await asyncio.sleep(0.05)

    async def scrape(self) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return body.decode()

    def stop(self) -> tuple[int, str]:
        rc = self.agent.stop()
        log = self.agent.log()
        return rc, log

    def spans(self) -> list[dict]:
        try:
            with open(self.spans_path) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []


def _ns(t: dict) -> int:
    return t["secs_since_epoch"] * 10**9 + t["nanos_since_epoch"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parse_text(text) for s in f.samples}


async def test_all_observability_options_on_a_running_agent():
    from containers.e2e import connect

    setup = Setup()
    try:
        await setup.ready()
        # Log forwarding: what was logged before anyone connected is there, as JSON lines.
        log_reader, log_writer = await asyncio.open_unix_connection(setup.logs)
        msgs = []
        async with asyncio.timeout(10):
            while "kagent ready" not in msgs:
                msgs.append(json.loads(await log_reader.readline())["msg"])
        # An RPC that joins the host's trace, and shows in the metrics.
        calls = await connect(setup.agent)
        check = protocols.find("Check")
        await calls.client.call(check.service, check.name, check.request(), check.response, timeout=10,
                                metadata={"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"})
        samples = _samples(await setup.scrape())
        assert samples[("kagent_rpc_requests_total", (("code", "OK"), ("rpc", "Check")))] >= 1
        assert ("kagent_container_workers", ()) in samples
        # GetMetrics: upstream's text, with kagent's families, parseable, no _created samples.
        text = (await calls.GetMetrics()).metrics
        families = {f.name: f.type for f in parse_text(text)}
        assert families["kagent_rpc_duration_seconds"] == "histogram"
        assert families["kata_agent_scrape_count"] == "counter"
        assert "_created" not in text
        # The debug console.
        console = await ConsoleClient.connect(setup.console)
        await console.expect(re.escape(HELLO))
        console.send("echo console-$((20+22)) pid=$$\n")
        shell = int((await console.expect(rb"console-42 pid=(\d+)")).group(1))
        # A log line the RPC produced reached the forwarder too (debug level: --log-level debug).
        async with asyncio.timeout(10):
            while True:
                rec = json.loads(await log_reader.readline())
                if rec.get("rpc") == "Check" or "debug console session" in rec["msg"]:
                    break
        await calls.client.close()
        await console.close()
        assert await wait_gone(shell)
        log_writer.close()
    finally:
        rc, log = setup.stop()
        spans = setup.spans()
        shutil.rmtree(setup.dir, ignore_errors=True)
    assert rc == 0, log[-3000:]
    # The agent flushed its spans when it stopped.
    check_spans = [s for s in spans if s["name"] == "check"]
    assert check_spans and check_spans[0]["span_context"]["trace_id"] == TRACE_ID


@pytest.mark.root
async def test_container_start_moves_the_counters():
    from containers.e2e import connect

    if devtools.find_busybox() is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    top = tempfile.mkdtemp(prefix="kagent-obs-rootfs-")
    os.chmod(top, 0o755)
    rootfs = devtools.build_busybox_rootfs(os.path.join(top, "rootfs"))
    setup = Setup()
    cid = f"obs-{uuid.uuid4().hex[:8]}"
    try:
        await setup.ready()
        before = _samples(await setup.scrape())
        calls = await connect(setup.agent)
        # cat echoes stdin to stdout: bytes in through WriteStdin, out through ReadStdout.
        await calls.create(cid, devtools.default_spec(rootfs, ["/bin/sh", "-c", "cat; sleep 1000"]))
        await calls.StartContainer(container_id=cid)
        await calls.WriteStdin(container_id=cid, exec_id=cid, data=b"x" * 5000)
        echoed = b""
        while len(echoed) < 5000:
            echoed += (await calls.ReadStdout(container_id=cid, exec_id=cid, len=65536)).data
        during = _samples(await setup.scrape())
        await calls.SignalProcess(container_id=cid, exec_id=cid, signal=9)
        await calls.WaitProcess(container_id=cid, exec_id=cid)
        await calls.RemoveContainer(container_id=cid)
        after = _samples(await setup.scrape())
        await calls.client.close()
    finally:
        rc, log = setup.stop()
        spans = setup.spans()
        shutil.rmtree(setup.dir, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
    assert rc == 0, log[-3000:]
    # CreateContainer's span has its main steps as children, the worker's steps among them
    # (timed there, where no tracer runs, and joined to the RPC's trace by the supervisor).
    by_id = {s["span_context"]["span_id"]: s for s in spans}
    create = next(s for s in spans if s["name"] == "create_container")
    kids = {s["name"]: s for s in spans if s["parent_span_id"] == create["span_context"]["span_id"]}
    assert {"worker fork", "container set-up"} <= set(kids), sorted(kids)
    setup_id = kids["container set-up"]["span_context"]["span_id"]
    steps = {s["name"] for s in spans if s["parent_span_id"] == setup_id}
    assert {"cgroup apply", "init set-up (namespaces, rootfs, process)"} <= steps, steps
    for s in spans:
        if s["parent_span_id"] in by_id:  # a child lies within its parent
            parent = by_id[s["parent_span_id"]]
            assert _ns(parent["start_time"]) <= _ns(s["start_time"]) <= _ns(s["end_time"]) <= \
                _ns(parent["end_time"]), (s["name"], parent["name"])

    def moved(name, labels=()):
        return during.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("kagent_container_start_seconds_count") == 1
    assert moved("kagent_container_create_seconds_count") == 1
    assert moved("kagent_rpc_requests_total", (("code", "OK"), ("rpc", "StartContainer"))) == 1
    assert echoed == b"x" * 5000
    assert moved("kagent_stdio_bytes_total", (("direction", "in"), ("path", "copy"))) == 5000
    out = (moved("kagent_stdio_bytes_total", (("direction", "out"), ("path", p))) for p in ("copy", "splice"))
    assert sum(out) == 5000
    assert during[("kagent_container_workers", ())] == 1
    assert after[("kagent_container_workers", ())] == 0


def test_kagent_ctl_console_subcommand(tmp_sock_dir):
    """``kagent-ctl console`` (the ctl entry point) opens a console session; other words stay RPCs."""
    import subprocess
    import sys
    import threading

    from support import REPO

    path = os.path.join(tmp_sock_dir, "console.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got: list[bytes] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(HELLO + b"$ ")
            conn.settimeout(5)
            while not b"".join(got).endswith(b"exit\n") and (data := conn.recv(1024)):
                got.append(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = subprocess.run([sys.executable, "-m", "kagent.cli.ctl", "--addr", path, "console"],
                         input=b"exit\n", capture_output=True, cwd=REPO, timeout=30)
    t.join(5)
    srv.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"$ " and b"".join(got) == b"exit\n"
