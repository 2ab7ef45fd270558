"""Direct stdio streams (passfd), end to end, against raw pipe ⇄ unix-socket loops.

    python -m bench.passfd [--quick]

The agent runs with its passfd listener (``agent.passfd_listener_addr``, a unix socket:
vsock has no loopback here) and ``agent.container_pipe_size=1048576``.  For stdout, a
container runs busybox ``dd if=/dev/zero bs=1M`` with ``stdout_port`` naming a stream this
process connected first; this process reads that stream to EOF.  For stdin, an exec'd
``dd of=/dev/null`` gets a ``stdin_port`` stream that this process fills, then closes;
the time runs to WaitProcess's answer (published after the pumps finish).

The baselines move the same bytes through the same kind of pipe (1 MiB) and unix socket
with nothing but a copy loop in between, in a process of its own as the agent is:
``readv`` into one preallocated buffer + ``send`` (the Python baseline the target is set
against) and a bare ``os.splice`` loop (the syscall as fast as C calls it).  Rounds
alternate; the median of per-round ratios is reported, with the agent's CPU per GiB.
"""

from __future__ import annotations

import fcntl
import os
import socket
import statistics
import subprocess
import time

import psutil

from bench.common import (
    PYTHON,
    REPO,
    AgentProc,
    SyncClient,
    absolute_row,
    busybox_rootfs,
    cli,
    ratio_row,
    skip_reason_for_containers,
)
from bench.stdio import F_SETPIPE_SZ, PIPE_SIZE, MiB, baseline

_ports = iter(range(30000 + os.getpid() % 10000 * 8, 1 << 30))


def host_stream(listen_path: str) -> tuple[socket.socket, int]:
    """What the VMM does for the host runtime: one stream, from a port the request then names."""
    port = next(_ports)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0kagent-bench-passfd-{os.getpid()}.{port}")
    s.connect(listen_path)
    return s, port


def _recv_all(sock: socket.socket) -> tuple[int, float]:
    view = memoryview(bytearray(MiB))
    n = sock.recv_into(view)
    start = time.perf_counter()
    total = n
    while n:
        n = sock.recv_into(view)
        total += n
    return total, time.perf_counter() - start


def agent_stdout(agent: AgentProc, listen: str, rootfs: str, cid: str, mib: int) -> tuple[float, float]:
    """(MB/s, agent CPU s/GiB): a container's dd → its stdout stream → this process."""
    from kagent import devtools, oci

    spec = devtools.default_spec(rootfs, ["/bin/dd", "if=/dev/zero", "bs=1M", f"count={mib}"])
    ctl = SyncClient(agent.sock)
    stream, port = host_stream(listen)
    me = psutil.Process(agent.pid)
    try:
        ctl.call("CreateContainer", container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec), stdout_port=port)
        cpu0 = sum(me.cpu_times()[:2])
        ctl.call("StartContainer", container_id=cid)
        total, seconds = _recv_all(stream)
        cpu = sum(me.cpu_times()[:2]) - cpu0
        ctl.call("WaitProcess", container_id=cid, exec_id=cid)
        ctl.call("RemoveContainer", container_id=cid)
    finally:
        stream.close()
        ctl.close()
    if total != mib * MiB:
        raise RuntimeError(f"stdout stream moved {total} bytes, not {mib * MiB}")
    return total / seconds / 1e6, cpu / (total / (1 << 30))


def agent_stdin(agent: AgentProc, listen: str, rootfs: str, cid: str, mib: int) -> tuple[float, float]:
    """(MB/s, agent CPU s/GiB): this process → an exec's stdin stream → dd of=/dev/null."""
    from kagent import devtools, oci

    ctl = SyncClient(agent.sock)
    stream, port = host_stream(listen)
    me = psutil.Process(agent.pid)
    chunk = bytes(MiB)
    try:
        ctl.call("CreateContainer", container_id=cid, exec_id=cid,
                 OCI=oci.spec_from_dict(devtools.default_spec(rootfs, ["/bin/sleep", "1000"])))
        ctl.call("StartContainer", container_id=cid)
        proc = devtools.default_spec(rootfs, ["/bin/dd", "of=/dev/null", "bs=1M"])["process"]
        ctl.call("ExecProcess", container_id=cid, exec_id="in", process=oci.process_from_dict(proc), stdin_port=port)
        cpu0 = sum(me.cpu_times()[:2])
        start = time.perf_counter()
        for _ in range(mib):
            stream.sendall(chunk)
        stream.shutdown(socket.SHUT_WR)
        status = ctl.call("WaitProcess", container_id=cid, exec_id="in").status
        seconds = time.perf_counter() - start
        cpu = sum(me.cpu_times()[:2]) - cpu0
        ctl.call("RemoveContainer", container_id=cid)
    finally:
        stream.close()
        ctl.close()
    if status != 0:
        raise RuntimeError(f"dd of=/dev/null exited {status}")
    return mib * MiB / seconds / 1e6, cpu / (mib / 1024)


# -- the stdin baselines: socket → copy loop → pipe (1 MiB) → dd of=/dev/null -------------------


def _copy_in(mode: str, src: int, dst: int) -> None:
    print("ready", flush=True)  # the clock starts once this process runs, as the agent already does
    start = os.times()
    if mode == "readv":
        view = memoryview(bytearray(MiB))
        while n := os.readv(src, [view]):
            mv = view[:n]
            while mv:
                mv = mv[os.write(dst, mv):]
    else:
        while os.splice(src, dst, MiB):
            pass
    end = os.times()
    print(end.user + end.system - start.user - start.system, flush=True)


def baseline_stdin(mode: str, mib: int, busybox: str) -> tuple[float, float]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chunk = bytes(MiB)
    try:
        copier = subprocess.Popen([PYTHON, "-m", "bench.passfd", "--copy-in", mode, str(far.fileno()), str(w)],
                                  pass_fds=(w, far.fileno()), cwd=REPO, stdout=subprocess.PIPE, text=True)
        os.close(w)
        far.close()
        dd = subprocess.Popen([busybox, "dd", "of=/dev/null", "bs=1M"], stdin=r, stderr=subprocess.DEVNULL)
        os.close(r)
        r = -1
        assert copier.stdout is not None and copier.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        for _ in range(mib):
            near.sendall(chunk)
        near.shutdown(socket.SHUT_WR)
        dd.wait(60)
        seconds = time.perf_counter() - start
        out, _ = copier.communicate(timeout=60)
    finally:
        near.close()
        if r >= 0:
            os.close(r)
    return mib * MiB / seconds / 1e6, float(out.strip() or "nan") / (mib / 1024)


def run(quick: bool = False) -> dict:
    skip = skip_reason_for_containers()
    if skip:
        return {"name": "passfd", "rows": [absolute_row("direct streams", None, "MB/s", target="—",
                                                        note=f"skipped: {skip}")], "details": {}}
    made = busybox_rootfs()
    assert made is not None
    top, rootfs = made
    busybox = os.path.join(rootfs, "bin", "busybox")
    mib = 32 if quick else 1024
    rounds = 1 if quick else 5
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    def add(key: str, rate: float, cpu_gib: float, base: float | None = None) -> None:
        rates.setdefault(key, []).append(rate)
        cpu.setdefault(key, []).append(cpu_gib)
        if base:
            ratios.setdefault(key, []).append(rate / base)

    agent = None
    try:
        workdir_sock = os.path.join("/tmp", f"kbench-passfd-{os.getpid()}.sock")
        agent = AgentProc(f"agent.container_pipe_size={PIPE_SIZE} agent.passfd_listener_addr=unix://{workdir_sock}")
        for n in range(rounds):
            out_base = baseline("readv", mib, busybox)
            add("out_readv", *out_base)
            add("out_splice", *baseline("splice", mib, busybox), out_base[0])
            add("out_agent", *agent_stdout(agent, workdir_sock, rootfs, f"o{n}", mib), out_base[0])
            in_base = baseline_stdin("readv", mib, busybox)
            add("in_readv", *in_base)
            add("in_splice", *baseline_stdin("splice", mib, busybox), in_base[0])
            add("in_agent", *agent_stdin(agent, workdir_sock, rootfs, f"i{n}", mib), in_base[0])
    finally:
        if agent is not None:
            agent.stop()
        import shutil

        shutil.rmtree(top, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    rows = []
    for d, label in (("out", "stdout: container → stream"), ("in", "stdin: stream → exec")):
        row = ratio_row(f"direct stream {label}, pipe 1 MiB", med[f"{d}_agent"], med[f"{d}_readv"], "MB/s",
                        baseline_name="readv loop", target="≥ 1.0x", at_least=1.0,
                        note=f"median of per-round ratios; agent CPU {cpu_med[f'{d}_agent']:.2f} s/GiB "
                             f"(readv loop {cpu_med[f'{d}_readv']:.2f}); bare splice loop "
                             f"{med[f'{d}_splice']:,.0f} MB/s ({statistics.median(ratios[f'{d}_splice']):.2f}x)")
        row.ratio = statistics.median(ratios[f"{d}_agent"])
        row.met = row.ratio >= 1.0
        rows.append(row)
    return {"name": "passfd", "rows": rows,
            "details": {"MB_per_s": rates, "cpu_s_per_GiB": cpu, "ratios": ratios, "mib_per_run": mib,
                        "rounds": rounds}}


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--copy-in":
        _copy_in(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        cli(run)
