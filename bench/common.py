"""What every benchmark shares: result rows, statistics, a real agent process, the CLI.

A benchmark module exposes ``run(quick: bool) -> dict`` returning
``{"name": ..., "rows": [Row...], "details": {...}}`` and ends with
``if __name__ == "__main__": cli(run)``.  A row compares a measurement with a
baseline measured in the same run (these machines are noisy: ratios, not
absolute times, are what carries from run to run) and says whether the target
is met.  ``met`` is None when there is nothing to judge (a skipped baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@dataclass
class Row:
    benchmark: str
    measured: float | None
    unit: str
    baseline: float | None = None  # same unit, measured in the same run
    baseline_name: str = ""
    ratio: float | None = None  # measured / baseline
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_row(benchmark: str, measured: float | None, baseline: float | None, unit: str, *,
              baseline_name: str, target: str, at_least: float | None = None,
              at_most: float | None = None, note: str = "") -> Row:
    """A row judged on measured/baseline: ``at_least`` for rates, ``at_most`` for times."""
    ratio = measured / baseline if measured is not None and baseline else None
    met = None
    if ratio is not None and (at_least is not None or at_most is not None):
        met = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
    return Row(benchmark, measured, unit, baseline, baseline_name, ratio, target, met, note)


def absolute_row(benchmark: str, measured: float | None, unit: str, *, target: str,
                 at_least: float | None = None, at_most: float | None = None, note: str = "") -> Row:
    met = None
    if measured is not None and (at_least is not None or at_most is not None):
        met = (at_least is None or measured >= at_least) and (at_most is None or measured <= at_most)
    return Row(benchmark, measured, unit, target=target, met=met, note=note)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("MB/s", "req/s", "ops/s"):
        return f"{value:,.0f} {unit}"
    if unit == "µs":
        return f"{value:,.1f} µs"
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "s/GiB":
        return f"{value:.3f} s/GiB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.3g} {unit}"


# -- a real agent -----------------------------------------------------------------


class AgentProc:
    """``python -m kagent`` on a unix socket in its own work directory."""

    def __init__(self, cmdline: str = "quiet", env: dict[str, str] | None = None, *,
                 log_level: str = "info") -> None:
        self.workdir = tempfile.mkdtemp(prefix="kbench-", dir="/tmp")
        self.sock = os.path.join(self.workdir, "agent.sock")
        self.addr = "unix://" + self.sock
        self.run_dir = os.path.join(self.workdir, "run")
        with open(os.path.join(self.workdir, "cmdline"), "w") as f:
            f.write(cmdline + "\n")
        self.log_path = os.path.join(self.workdir, "agent.log")
        log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "kagent", "--cmdline-file", os.path.join(self.workdir, "cmdline"),
             "--server-addr", self.addr, "--log-level", log_level],
            stdout=log, stderr=log, cwd=REPO,
            env={**os.environ, "KAGENT_RUN_DIR": self.run_dir, **(env or {})})
        log.close()
        try:
            self.ready_after = wait_accepting(self.sock, self.proc) - self.started
        except BaseException as exc:
            text = self.log()[-2000:]
            self.stop()
            raise RuntimeError(f"kagent did not start: {exc}\n{text}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> AgentProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_accepting(path: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> float:
    """Poll until a unix socket accepts a connection; return perf_counter() at that moment."""
    deadline = time.perf_counter() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return time.perf_counter()
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before accepting") from None
            if time.perf_counter() > deadline:
                raise TimeoutError(f"nothing accepted on {path} within {timeout}s") from None
            time.sleep(0.0005)
        finally:
            s.close()


def busybox_rootfs() -> tuple[str, str] | None:
    """(top, rootfs) of a fresh busybox rootfs, or None without busybox; rm -r top after."""
    from kagent import devtools

    if devtools.find_busybox() is None:
        return None
    top = tempfile.mkdtemp(prefix="kbench-rootfs-")
    os.chmod(top, 0o755)
    return top, devtools.build_busybox_rootfs(os.path.join(top, "rootfs"))


def skip_reason_for_containers() -> str | None:
    from kagent import devtools

    if os.geteuid() != 0:
        return "needs root (real namespaces)"
    if devtools.find_busybox() is None:
        return "busybox is not installed (apt-get install busybox-static)"
    return None


# -- the command line -----------------------------------------------------------------


def print_rows(rows: Sequence[Row], out=sys.stdout) -> None:
    for r in rows:
        base = f" vs {fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline is not None else ""
        ratio = f" = {r.ratio:.2f}x" if r.ratio is not None else ""
        verdict = {True: "met", False: "MISSED", None: "—"}[r.met]
        note = f"  [{r.note}]" if r.note else ""
        print(f"  {r.benchmark:<44} {fmt(r.measured, r.unit)}{base}{ratio}   target {r.target or '—'}: "
              f"{verdict}{note}", file=out)


def cli(run: Callable[[bool], dict]) -> None:
    """``python -m bench.NAME [--quick] [--json PATH]``: run, print the rows, optionally save."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (the smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args()
    result = run(args.quick)
    print(f"{result['name']}:")
    print_rows(result["rows"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(result), f, indent=2, default=str)


def to_json(result: dict) -> dict:
    return {**result, "rows": [r.as_dict() if isinstance(r, Row) else r for r in result["rows"]]}


# -- a blocking ttRPC client (least client overhead: the server is what is measured) ---------


class SyncClient:
    """One blocking unix-socket connection; calls are sequential: ``call("WaitProcess", ...)``."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._next = 1
        self._head = bytearray(10)

    def frame(self, method: str, request: Any) -> tuple[int, bytes]:
        from kagent import protocols
        from kagent.protocols import ttrpc_pb2
        from kagent.ttrpc import framing

        m = protocols.find(method)
        body = ttrpc_pb2.Request(service=m.service, method=m.name,
                                 payload=request.SerializeToString()).SerializeToString()
        sid = self._next
        self._next += 2
        return sid, framing.encode_header(len(body), sid, framing.TYPE_REQUEST, 0) + body

    def recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("agent closed the connection")
            got += n

    def call(self, method: str, **fields: Any) -> Any:
        from kagent import protocols
        from kagent.protocols import ttrpc_pb2

        m = protocols.find(method)
        _, frame = self.frame(method, m.request(**fields))
        self.sock.sendall(frame)
        self.recv_exact(memoryview(self._head))
        length = int.from_bytes(self._head[:4], "big")
        body = bytearray(length)
        self.recv_exact(memoryview(body))
        resp = ttrpc_pb2.Response.FromString(bytes(body))
        if resp.status.code:
            raise RuntimeError(f"{method}: code {resp.status.code}: {resp.status.message}")
        return m.response.FromString(resp.payload)

    def close(self) -> None:
        self.sock.close()
