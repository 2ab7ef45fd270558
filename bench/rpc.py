"""RPC: Health.Check latency and pipelined throughput against a bare uvloop echo server.

    python -m bench.rpc [--quick]

The agent is a real ``python -m kagent`` process; the baseline is a minimal
uvloop server that echoes every byte it reads (the least any server on this
loop can do).  One lean client (this process, uvloop) drives both the same
way: the same request frames, the same decoder, the same clock.

Latency: p50/p99 of one round trip with 1, 16 and 256 requests in flight, on
one connection and on as many connections as requests (at most 60: the agent
serves 64 by default, agent.ttrpc_max_connections).  Throughput: requests
per second with 256 always in flight on one connection (each reply read sends
the next requests in one write).  Servers run in turns, several rounds each,
and the median of the rounds is reported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import uvloop

from bench.common import (
    PYTHON,
    REPO,
    AgentProc,
    absolute_row,
    cli,
    percentile,
    ratio_row,
    wait_accepting,
)
from kagent.protocols import health_pb2, ttrpc_pb2
from kagent.ttrpc import framing

_BODY = ttrpc_pb2.Request(service="grpc.Health", method="Check",
                          payload=health_pb2.CheckRequest().SerializeToString()).SerializeToString()
_HEADER = framing.encode_header


def request_frame(stream_id: int) -> bytes:
    return _HEADER(len(_BODY), stream_id, framing.TYPE_REQUEST, 0) + _BODY


# -- the baseline server ---------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _serve_echo(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(_Echo, path)
    async with server:
        await server.serve_forever()


class EchoProc:
    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="kbench-echo-", dir="/tmp")
        self.sock = os.path.join(self.workdir, "echo.sock")
        self.proc = subprocess.Popen([PYTHON, "-m", "bench.rpc", "--serve-echo", self.sock], cwd=REPO)
        try:
            wait_accepting(self.sock, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def addr(self) -> str:
        return self.sock

    def stop(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- the lean client ------------------------------------------------------------------


class _Lean(asyncio.Protocol):
    """Matches replies to waiters by stream id; or, pipelined, answers each reply with a request."""

    def __init__(self) -> None:
        self.decoder = framing.FrameDecoder()
        self.waiters: dict[int, asyncio.Future] = {}
        self.pipelined = False
        self.done = 0
        self.next_id = 1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        frames = self.decoder.feed(data)
        if self.pipelined:
            self.done += len(frames)
            out = []
            sid = self.next_id
            for _ in frames:
                out.append(request_frame(sid))
                sid += 2
            self.next_id = sid
            self.transport.write(b"".join(out))
            return
        for sid, _t, _f, _l, _p in frames:
            fut = self.waiters.pop(sid, None)
            if fut is not None:
                fut.set_result(None)

    def connection_lost(self, exc) -> None:
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("server went away"))


async def _connect(path: str) -> _Lean:
    for _ in range(200):
        try:
            _, proto = await asyncio.get_running_loop().create_unix_connection(_Lean, path)
            return proto
        except BlockingIOError:  # the listen backlog is full: let the server accept
            await asyncio.sleep(0.005)
    raise ConnectionError(f"cannot connect to {path}")


async def _latencies(conns: list[_Lean], callers: int, rounds: int) -> list[float]:
    """``callers`` spread over the connections, each doing ``rounds`` sequential round trips."""
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    clock = time.perf_counter

    async def caller(proto: _Lean) -> None:
        for _ in range(rounds):
            sid = proto.next_id
            proto.next_id += 2
            fut = loop.create_future()
            proto.waiters[sid] = fut
            start = clock()
            proto.transport.write(request_frame(sid))
            await fut
            samples.append(clock() - start)

    await asyncio.gather(*(caller(conns[i % len(conns)]) for i in range(callers)))
    return samples


MAX_CONNS = 60  # the agent serves 64 connections by default (agent.ttrpc_max_connections)


def connections_for(concurrency: int, many: bool) -> int:
    return min(concurrency, MAX_CONNS) if many else 1


async def _latency_case(path: str, concurrency: int, many: bool, total: int) -> dict[str, float]:
    n_conn = connections_for(concurrency, many)
    conns = [await _connect(path) for _ in range(n_conn)]
    rounds = max(20, total // concurrency)
    try:
        await _latencies(conns, concurrency, max(5, rounds // 10))  # warm up
        samples = await _latencies(conns, concurrency, rounds)
    finally:
        for p in conns:
            p.transport.close()
    return {"p50_us": percentile(samples, 50) * 1e6, "p99_us": percentile(samples, 99) * 1e6,
            "n": len(samples)}


async def _pipelined(path: str, depth: int, seconds: float) -> float:
    proto = await _connect(path)
    try:
        proto.pipelined = True
        frames = []
        for _ in range(depth):
            frames.append(request_frame(proto.next_id))
            proto.next_id += 2
        proto.transport.write(b"".join(frames))
        await asyncio.sleep(min(0.2, seconds / 4))  # warm up
        start_n, start = proto.done, time.perf_counter()
        await asyncio.sleep(seconds)
        return (proto.done - start_n) / (time.perf_counter() - start)
    finally:
        proto.transport.close()


CASES = [(1, False), (16, False), (256, False), (16, True), (256, True)]


async def _measure(servers: dict[str, str], quick: bool) -> dict:
    total = 2_000 if quick else 20_000
    rounds = 1 if quick else 5
    seconds = 0.3 if quick else 2.0
    out: dict = {name: {} for name in servers}
    for _ in range(rounds):
        for conc, many in CASES:
            key = f"c{conc}_{'many' if many else 'one'}"
            for name, path in servers.items():
                r = await _latency_case(path, conc, many, total)
                out[name].setdefault(key, []).append(r)
        for name, path in servers.items():
            out[name].setdefault("pipelined_256", []).append(await _pipelined(path, 256, seconds))
    summary: dict = {}
    for name, cases in out.items():
        summary[name] = {}
        for key, values in cases.items():
            if key == "pipelined_256":
                summary[name][key] = statistics.median(values)
            else:
                summary[name][key] = {m: statistics.median(v[m] for v in values) for m in ("p50_us", "p99_us")}
    return summary


def run(quick: bool = False) -> dict:
    echo = EchoProc()
    agent = traced = None
    spans = tempfile.mkdtemp(prefix="kbench-spans-", dir="/tmp")
    try:
        agent = AgentProc()
        # The same agent with tracing on (spans to a file): what agent.trace costs per RPC.
        traced = AgentProc(f"agent.trace agent.trace_file={spans}/spans.jsonl")
        summary = uvloop.run(_measure({"agent": agent.sock, "echo": echo.addr, "traced": traced.sock}, quick))
    finally:
        for proc in (agent, traced):
            if proc is not None:
                proc.stop()
        echo.stop()
        shutil.rmtree(spans, ignore_errors=True)
    rows = []
    for conc, many in CASES:
        key = f"c{conc}_{'many' if many else 'one'}"
        where = f"{connections_for(conc, many)} conns" if many else "1 conn"
        a, e = summary["agent"][key], summary["echo"][key]
        rows.append(ratio_row(f"Health.Check p50, {conc} in flight, {where}", a["p50_us"], e["p50_us"], "µs",
                              baseline_name="uvloop echo", target="≤ 1.2x", at_most=1.2))
        rows.append(ratio_row(f"Health.Check p99, {conc} in flight, {where}", a["p99_us"], e["p99_us"], "µs",
                              baseline_name="uvloop echo", target="≤ 1.5x", at_most=1.5))
    on, off = summary["traced"]["c1_one"], summary["agent"]["c1_one"]
    for q in ("p50", "p99"):
        rows.append(ratio_row(f"Health.Check {q}, 1 in flight, agent.trace on (file exporter)", on[f"{q}_us"],
                              off[f"{q}_us"], "µs", baseline_name="agent.trace off", target="(reported)",
                              note="tracing off puts no interceptor and no span on the RPC path"))
    rows.append(ratio_row("Health.Check pipelined 256 deep, agent.trace on", summary["traced"]["pipelined_256"],
                          summary["agent"]["pipelined_256"], "req/s", baseline_name="agent.trace off",
                          target="(reported)"))
    thr = summary["agent"]["pipelined_256"]
    rows.append(absolute_row("Health.Check pipelined 256 deep, 1 conn", thr, "req/s", target="≥ 250,000 req/s",
                             at_least=250_000,
                             note=f"uvloop echo: {summary['echo']['pipelined_256']:,.0f} frames/s"))
    return {"name": "rpc", "rows": rows, "details": summary}


def _serve_echo_main(path: str) -> None:
    try:
        uvloop.run(_serve_echo(path))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-echo":
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _serve_echo_main(sys.argv[2])
    else:
        cli(run)
