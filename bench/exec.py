"""Exec: ExecProcess + WaitProcess of /bin/true in a running container, p50/p90/p99.

    python -m bench.exec [--quick]

One busybox container runs ``sleep``; a blocking client in this process execs
``/bin/true`` into it back to back (warm).  The targets are absolute (p50 ≤ 5 ms,
p90 ≤ 10 ms); ``runc exec`` into a runc container of the same bundle is
measured alongside for reference when runc is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from bench.common import (
    AgentProc,
    Row,
    SyncClient,
    absolute_row,
    busybox_rootfs,
    cli,
    percentile,
    skip_reason_for_containers,
)
from bench.lifecycle import remove_cgroup_parent


def _runc_exec_times(rootfs: str, parent: str, n: int) -> list[float]:
    runc = shutil.which("runc")
    if runc is None:
        return []
    from kagent import devtools

    work = tempfile.mkdtemp(prefix="kbench-runc-", dir="/tmp")
    cid = "rexec-" + uuid.uuid4().hex[:6]
    state = os.path.join(work, "state")
    try:
        spec = devtools.default_spec(rootfs, ["/bin/sleep", "1000"])
        spec["linux"]["cgroupsPath"] = f"/{parent}/{cid}"
        bundle = os.path.join(work, "bundle")
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        subprocess.run([runc, "--root", state, "run", "-d", "--bundle", bundle, cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = []
        for i in range(n + 2):
            start = time.perf_counter()
            subprocess.run([runc, "--root", state, "exec", cid, "/bin/true"], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return times
    finally:
        subprocess.run([runc, "--root", state, "delete", "-f", cid], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False) -> dict:
    from kagent import devtools, oci

    skip = skip_reason_for_containers()
    if skip:
        return {"name": "exec", "rows": [absolute_row("exec /bin/true", None, "ms", target="—",
                                                      note=f"skipped: {skip}")], "details": {}}
    n = 10 if quick else 200
    parent = "kagent-test-bench-" + uuid.uuid4().hex[:8]
    top, rootfs = busybox_rootfs()  # type: ignore[misc]
    agent = ctl = None
    times: list[float] = []
    process = oci.process_from_dict({"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"]})
    try:
        agent = AgentProc(f"agent.cgroup_parent={parent}")
        ctl = SyncClient(agent.sock)
        spec = devtools.default_spec(rootfs, ["/bin/sleep", "1000"])
        ctl.call("CreateContainer", container_id="c1", exec_id="c1", OCI=oci.spec_from_dict(spec))
        ctl.call("StartContainer", container_id="c1")
        for i in range(n + 5):
            start = time.perf_counter()
            ctl.call("ExecProcess", container_id="c1", exec_id=f"e{i}", process=process)
            status = ctl.call("WaitProcess", container_id="c1", exec_id=f"e{i}").status
            elapsed = time.perf_counter() - start
            if status != 0:
                raise RuntimeError(f"exec /bin/true exited {status}")
            if i >= 5:  # warm-up
                times.append(elapsed)
        ctl.call("RemoveContainer", container_id="c1")
        runc_times = _runc_exec_times(rootfs, parent, max(5, n // 4))
    finally:
        if ctl is not None:
            ctl.close()
        if agent is not None:
            agent.stop()
        shutil.rmtree(top, ignore_errors=True)
        remove_cgroup_parent(parent)
    ms = {f"p{q}": percentile(times, q) * 1e3 for q in (50, 90, 99)}
    runc_ms = {f"p{q}": percentile(runc_times, q) * 1e3 for q in (50, 90)} if runc_times else None
    ref = f"runc exec p50 {runc_ms['p50']:.1f} ms" if runc_ms else "runc not installed"
    rows: list[Row] = [
        absolute_row("exec /bin/true p50", ms["p50"], "ms", target="≤ 5 ms", at_most=5.0, note=ref),
        absolute_row("exec /bin/true p90", ms["p90"], "ms", target="≤ 10 ms", at_most=10.0),
        absolute_row("exec /bin/true p99", ms["p99"], "ms", target="(reported)"),
    ]
    return {"name": "exec", "rows": rows, "details": {"ms": ms, "runc_exec_ms": runc_ms, "runs": n}}


if __name__ == "__main__":
    cli(run)
