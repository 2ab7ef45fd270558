"""Container lifecycle: create + start + wait + remove of /bin/true, against ``runc run``.

    python -m bench.lifecycle [--quick]

The agent is a real ``python -m kagent`` (its cgroups under a
``kagent-test-bench-*`` parent); the client is a blocking socket in this
process, one RPC after another.  The baseline is Debian's ``runc run`` of the
same busybox bundle (runc's default spec: the same namespaces, mounts, masked
paths and capabilities), its cgroup under the same kind of parent.  Both run
warm and back to back (after an idle moment the first cgroup write can wait
for an RCU grace period), alternating in rounds.  Without runc the baseline is
skipped and said so.
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
    SyncClient,
    absolute_row,
    busybox_rootfs,
    cli,
    percentile,
    ratio_row,
    skip_reason_for_containers,
)

CONTROLLERS = ("blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "systemd", "unified")


def remove_cgroup_parent(name: str) -> None:
    """rmdir our parent (and anything left under it) in every hierarchy; never anything else."""
    assert name.startswith("kagent-test-bench-")
    for ctrl in CONTROLLERS:
        top = os.path.join("/sys/fs/cgroup", ctrl, name)
        if not os.path.isdir(top):
            continue
        for root, dirs, _ in os.walk(top, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    pass
        try:
            os.rmdir(top)
        except OSError:
            pass


def agent_cycle(ctl: SyncClient, spec_msg, cid: str) -> float:
    start = time.perf_counter()
    ctl.call("CreateContainer", container_id=cid, exec_id=cid, OCI=spec_msg)
    ctl.call("StartContainer", container_id=cid)
    status = ctl.call("WaitProcess", container_id=cid, exec_id=cid).status
    ctl.call("RemoveContainer", container_id=cid)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"/bin/true in {cid} exited {status}")
    return elapsed


def runc_cycle(runc: str, state: str, bundle: str, cid: str) -> float:
    start = time.perf_counter()
    rc = subprocess.run([runc, "--root", state, "run", "--bundle", bundle, cid], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if rc.returncode != 0:
        raise RuntimeError(f"runc run failed ({rc.returncode}): {rc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def run(quick: bool = False) -> dict:
    from kagent import devtools, oci

    skip = skip_reason_for_containers()
    if skip:
        return {"name": "lifecycle", "rows": [absolute_row("create+start+wait+remove /bin/true", None, "ms",
                                                           target="—", note=f"skipped: {skip}")], "details": {}}
    n = 5 if quick else 60
    warm = 2 if quick else 5
    parent = "kagent-test-bench-" + uuid.uuid4().hex[:8]
    top, rootfs = busybox_rootfs()  # type: ignore[misc]
    runc = shutil.which("runc")
    work = tempfile.mkdtemp(prefix="kbench-runc-", dir="/tmp")
    agent = ctl = None
    times: dict[str, list[float]] = {"agent": [], "runc": []}
    try:
        agent = AgentProc(f"agent.cgroup_parent={parent}")
        ctl = SyncClient(agent.sock)
        spec = devtools.default_spec(rootfs, ["/bin/true"])
        spec_msg = oci.spec_from_dict(spec)
        bundle = os.path.join(work, "bundle")
        os.makedirs(bundle)
        runc_spec = json.loads(json.dumps(spec))
        runc_spec["linux"]["cgroupsPath"] = f"/{parent}/runc"
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(runc_spec, f)
        state = os.path.join(work, "state")
        for i in range(warm):
            agent_cycle(ctl, spec_msg, f"w{i}")
            if runc:
                runc_cycle(runc, state, bundle, f"rw{i}")
        for i in range(n):  # alternate, so both see the same machine
            times["agent"].append(agent_cycle(ctl, spec_msg, f"c{i}"))
            if runc:
                times["runc"].append(runc_cycle(runc, state, bundle, f"r{i}"))
    finally:
        if ctl is not None:
            ctl.close()
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
        remove_cgroup_parent(parent)
    stats = {k: {f"p{q}": percentile(v, q) * 1e3 for q in (50, 90, 99)} for k, v in times.items() if v}
    a = stats["agent"]
    r = stats.get("runc")
    note = "" if runc else "runc not installed (apt-get install runc): no baseline"
    rows = [
        ratio_row("lifecycle /bin/true p50", a["p50"], r and r["p50"], "ms", baseline_name="runc run",
                  target="≤ 0.5x", at_most=0.5, note=note),
        ratio_row("lifecycle /bin/true p90", a["p90"], r and r["p90"], "ms", baseline_name="runc run",
                  target="≤ 0.75x", at_most=0.75, note=note),
        ratio_row("lifecycle /bin/true p99", a["p99"], r and r["p99"], "ms", baseline_name="runc run",
                  target="(reported)", note=note),
    ]
    return {"name": "lifecycle", "rows": rows, "details": {"ms": stats, "runs": n}}


if __name__ == "__main__":
    cli(run)
