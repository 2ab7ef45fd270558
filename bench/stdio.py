"""Stdio throughput: ReadStdout from a container against raw pipe → unix-socket copy loops.

    python -m bench.stdio [--quick]

A container runs busybox ``dd if=/dev/zero bs=1M`` into its stdout; a lean
blocking client (this process) reads it back with ReadStdout ``len`` = 1 MiB
and 32 KiB (what the Kata Go shim asks) until EOF, the agent started with
``agent.container_pipe_size=1048576``, once with each way of sending a reply
(``KAGENT_STDIO=copy`` and ``splice``; see kagent/stdio.py).

The baselines move the same dd's output through the same kind of pipe (1 MiB)
into a unix socket read by the same kind of reader, with nothing but a copy
loop in between (its own process, like the agent): ``readv`` into one
preallocated buffer + ``send`` (the honest Python baseline), and an
``os.splice`` loop (the syscall as fast as C calls it).  Rates count from the
first byte received to EOF; runs alternate and the median is reported.  The
agent's CPU time per GiB is its supervisor's user + system time while serving.
"""

from __future__ import annotations

import fcntl
import os
import socket
import statistics
import subprocess
import sys
import time

import psutil

from bench.common import (
    PYTHON,
    REPO,
    AgentProc,
    Row,
    SyncClient,
    absolute_row,
    busybox_rootfs,
    cli,
    ratio_row,
    skip_reason_for_containers,
)
from kagent.ttrpc import framing

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
MiB = 1 << 20


# -- the raw baselines --------------------------------------------------------------------


def _copy_loop(mode: str, src: int, dst: int) -> None:
    """The baseline's middle process: pipe ``src`` → socket ``dst`` until EOF; prints its CPU seconds."""
    start = os.times()
    if mode == "readv":
        view = memoryview(bytearray(MiB))
        sock = socket.socket(fileno=dst)
        while True:
            n = os.readv(src, [view])
            if not n:
                break
            sock.sendall(view[:n])
    elif mode == "splice":
        while os.splice(src, dst, MiB):
            pass
    else:  # "passfd": the agent's direct-stream pump (kagent.passfd), in a uvloop loop as in the agent
        import uvloop

        from kagent import passfd

        async def pump() -> None:
            await passfd.Pump(src, dst, name="bench stdout").done

        uvloop.run(pump())
    end = os.times()
    print(end.user + end.system - start.user - start.system, flush=True)


def _recv_all(sock: socket.socket, view: memoryview) -> tuple[int, float]:
    """Bytes read to EOF and the seconds from the first byte to EOF."""
    n = sock.recv_into(view)
    start = time.perf_counter()
    total = n
    while n:
        n = sock.recv_into(view)
        total += n
    return total, time.perf_counter() - start


def baseline(mode: str, mib: int, busybox: str) -> tuple[float, float]:
    """(MB/s, copier CPU seconds per GiB) of dd → pipe (1 MiB) → copy loop → unix socket → reader."""
    r, w = os.pipe()
    fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_SIZE)
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        copier = subprocess.Popen([PYTHON, "-m", "bench.stdio", "--copy-loop", mode, str(r), str(far.fileno())],
                                  pass_fds=(r, far.fileno()), cwd=REPO, stdout=subprocess.PIPE, text=True)
        os.close(r)
        far.close()
        dd = subprocess.Popen([busybox, "dd", "if=/dev/zero", "bs=1M", f"count={mib}"], stdout=w,
                              stderr=subprocess.DEVNULL)
        os.close(w)
        w = -1
        total, seconds = _recv_all(near, memoryview(bytearray(MiB)))
        dd.wait(60)
        out, _ = copier.communicate(timeout=60)
    finally:
        near.close()
        if w >= 0:
            os.close(w)
    if total != mib * MiB:
        raise RuntimeError(f"baseline {mode} moved {total} bytes, not {mib * MiB}")
    return total / seconds / 1e6, float(out.strip() or "nan") / (total / (1 << 30))


# -- the agent ------------------------------------------------------------------------------


class LeanReader:
    """ReadStdout in a loop on a blocking socket, parsing the reply by hand in one buffer.

    One request is in flight at a time (as the Kata shim reads a stream), and each reply is
    read with as few recv calls as it arrives in (usually one: header and data together),
    so the client's own cost weighs as little as it can on the agent's figure."""

    def __init__(self, path: str) -> None:
        self.client = SyncClient(path)
        self.buf = bytearray(framing.HEADER_SIZE + framing.MESSAGE_LENGTH_MAX)
        self.view = memoryview(self.buf)

    def read_all(self, cid: str, size: int) -> tuple[int, float]:
        from kagent.protocols import agent_pb2, ttrpc_pb2

        _, frame = self.client.frame("ReadStdout", agent_pb2.ReadStreamRequest(container_id=cid, exec_id=cid,
                                                                                 len=size))
        body = frame[framing.HEADER_SIZE:]
        sock, buf, view = self.client.sock, self.buf, self.view
        hs = framing.HEADER_SIZE
        total, start, sid = 0, None, 1
        while True:
            sid += 2
            sock.sendall(framing.encode_header(len(body), sid, framing.TYPE_REQUEST, 0) + body)
            filled = 0
            while filled < hs:
                n = sock.recv_into(view[filled:])
                if not n:
                    raise ConnectionError("agent closed the connection")
                filled += n
            length = int.from_bytes(buf[:4], "big")
            while filled < hs + length:
                n = sock.recv_into(view[filled:])
                if not n:
                    raise ConnectionError("agent closed the connection")
                filled += n
            if buf[hs] != 0x0A or buf[hs + 1] != 0:
                resp = ttrpc_pb2.Response.FromString(bytes(buf[hs:hs + length]))
                raise RuntimeError(f"ReadStdout failed: {resp.status.code} {resp.status.message}")
            if length == 2:  # an empty payload: EOF
                return total, time.perf_counter() - (start or time.perf_counter())
            pos = hs + 3
            while buf[pos] & 0x80:  # the payload length varint
                pos += 1
            pos += 2  # its last byte, then the data field's tag (0x0a)
            count = shift = 0
            while True:
                b = buf[pos]
                count |= (b & 0x7F) << shift
                pos += 1
                if not b & 0x80:
                    break
                shift += 7
            if start is None:
                start = time.perf_counter()
            total += count

    def close(self) -> None:
        self.client.close()


def agent_run(agent: AgentProc, rootfs: str, cid: str, mib: int, size: int) -> tuple[float, float]:
    """(MB/s, server CPU seconds per GiB) of one container's dd read back with ReadStdout."""
    from kagent import devtools, oci

    spec = devtools.default_spec(rootfs, ["/bin/dd", "if=/dev/zero", "bs=1M", f"count={mib}"])
    ctl = SyncClient(agent.sock)
    reader = LeanReader(agent.sock)
    me = psutil.Process(agent.pid)
    try:
        ctl.call("CreateContainer", container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec))
        cpu0 = sum(me.cpu_times()[:2])
        ctl.call("StartContainer", container_id=cid)
        total, seconds = reader.read_all(cid, size)
        cpu = sum(me.cpu_times()[:2]) - cpu0
        ctl.call("WaitProcess", container_id=cid, exec_id=cid)
        ctl.call("RemoveContainer", container_id=cid)
    finally:
        reader.close()
        ctl.close()
    if total != mib * MiB:
        raise RuntimeError(f"ReadStdout len {size} got {total} bytes, not {mib * MiB}")
    return total / seconds / 1e6, cpu / (total / (1 << 30))


def run(quick: bool = False) -> dict:
    skip = skip_reason_for_containers()
    if skip:
        return {"name": "stdio", "rows": [absolute_row("ReadStdout throughput", None, "MB/s", target="—",
                                                       note=f"skipped: {skip}")], "details": {}}
    mib = 32 if quick else 1024
    rounds = 1 if quick else 5
    made = busybox_rootfs()
    assert made is not None
    top, rootfs = made
    busybox = os.path.join(rootfs, "bin", "busybox")
    cmdline = f"agent.container_pipe_size={PIPE_SIZE}"
    agents: dict[str, AgentProc] = {}
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for mode in ("copy", "splice"):
            agents[mode] = AgentProc(cmdline, env={"KAGENT_STDIO": mode})
        n = 0
        for _ in range(rounds):  # each round: the baselines, then every agent case, on the same machine state
            base, base_cpu = baseline("readv", mib, busybox)
            rates.setdefault("baseline_readv", []).append(base)
            cpu.setdefault("baseline_readv", []).append(base_cpu)
            rate, splice_cpu = baseline("splice", mib, busybox)
            rates.setdefault("baseline_splice", []).append(rate)
            cpu.setdefault("baseline_splice", []).append(splice_cpu)
            ratios.setdefault("baseline_splice", []).append(rate / base)
            for mode, agent in agents.items():
                for size in (MiB, 32 << 10):
                    n += 1
                    key = f"{mode}_{size}"
                    rate, cpu_gib = agent_run(agent, rootfs, f"s{n}", mib if size == MiB else max(8, mib // 4), size)
                    rates.setdefault(key, []).append(rate)
                    ratios.setdefault(key, []).append(rate / base)
                    cpu.setdefault(key, []).append(cpu_gib)
    finally:
        for agent in agents.values():
            agent.stop()
        import shutil

        shutil.rmtree(top, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    base = med["baseline_readv"]
    from kagent import stdio

    default = stdio.MODE

    def row(label: str, key: str, target: str, at_least: float | None, note: str = "") -> Row:
        r = ratio_row(label, med[key], base, "MB/s", baseline_name="readv loop", target=target, at_least=at_least,
                      note=note)
        r.ratio = ratio[key]  # the median of per-round ratios: steadier than a ratio of medians
        if at_least is not None:
            r.met = r.ratio >= at_least
        return r

    rows = [
        row("ReadStdout len 1 MiB, pipe 1 MiB, copy", f"copy_{MiB}", "≥ 0.9x", 0.9,
            f"{cpu_med[f'copy_{MiB}']:.2f} s CPU/GiB"),
        row("ReadStdout len 1 MiB, pipe 1 MiB, splice", f"splice_{MiB}", "≥ 1.0x", 1.0,
            f"{cpu_med[f'splice_{MiB}']:.2f} s CPU/GiB"),
        absolute_row(f"ReadStdout len 1 MiB, server CPU ({default}, the default)", cpu_med[f"{default}_{MiB}"],
                     "s/GiB", target="≤ 0.5 s/GiB", at_most=0.5,
                     note=f"readv loop {cpu_med['baseline_readv']:.2f}, splice loop "
                          f"{cpu_med['baseline_splice']:.2f} s/GiB"),
        row("ReadStdout len 32 KiB, pipe 1 MiB, copy", f"copy_{32 << 10}", "≥ 0.35x", 0.35,
            f"{cpu_med[f'copy_{32 << 10}']:.2f} s CPU/GiB"),
        row("ReadStdout len 32 KiB, pipe 1 MiB, splice", f"splice_{32 << 10}", "≥ 0.35x", 0.35,
            f"{cpu_med[f'splice_{32 << 10}']:.2f} s CPU/GiB"),
        row("raw splice loop (reference)", "baseline_splice", "(reference)", None),
    ]
    return {"name": "stdio", "rows": rows,
            "details": {"MB_per_s": rates, "ratios": ratios, "cpu_s_per_GiB": cpu, "mib_per_run": mib,
                        "rounds": rounds, "default_mode": default}}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--copy-loop":
        _copy_loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        cli(run)
