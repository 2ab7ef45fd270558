"""Memory: the supervisor's idle RSS, the zygote's, and USS/PSS per idle container worker.

    python -m bench.memory [--quick]

A real ``python -m kagent``; after it is idle, RSS of the supervisor and of the
zygote (which forks every worker: fork cost grows with its RSS); then with 1,
10 and 100 idle containers (``sleep``), the mean USS and PSS of a container
worker (psutil's memory_full_info, from /proc/PID/smaps_rollup).  USS is what a
worker costs alone; PSS shares what workers share with each other fairly.
"""

from __future__ import annotations

import shutil
import statistics
import time
import uuid

import psutil

from bench.common import (
    AgentProc,
    SyncClient,
    absolute_row,
    busybox_rootfs,
    cli,
    skip_reason_for_containers,
)
from bench.lifecycle import remove_cgroup_parent

MB = 1e6


def _workers(agent_pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(agent_pid).children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("kagent: worker"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _zygote(agent_pid: int) -> psutil.Process | None:
    for p in psutil.Process(agent_pid).children():
        try:
            if p.cmdline()[:1] == ["kagent: zygote"]:
                return p
        except psutil.Error:
            pass
    return None


def run(quick: bool = False) -> dict:
    from kagent import devtools, oci

    counts = (1, 3) if quick else (1, 10, 100)
    parent = "kagent-test-bench-" + uuid.uuid4().hex[:8]
    agent = AgentProc(f"agent.cgroup_parent={parent}")
    details: dict = {}
    rows = []
    made = None
    try:
        time.sleep(0.5)  # idle
        sup = psutil.Process(agent.pid).memory_full_info()
        details["supervisor_idle"] = {"rss_MB": sup.rss / MB, "uss_MB": sup.uss / MB, "pss_MB": sup.pss / MB}
        zy = _zygote(agent.pid)
        zinfo = zy.memory_full_info() if zy else None
        if zinfo:
            details["zygote"] = {"rss_MB": zinfo.rss / MB, "uss_MB": zinfo.uss / MB, "pss_MB": zinfo.pss / MB}
        rows.append(absolute_row("supervisor RSS, idle", sup.rss / MB, "MB", target="≤ 40 MB", at_most=40,
                                 note=f"USS {sup.uss / MB:.1f} MB"))
        if zinfo:
            rows.append(absolute_row("zygote RSS (forks every worker)", zinfo.rss / MB, "MB", target="small",
                                     note=f"USS {zinfo.uss / MB:.1f} MB"))
        skip = skip_reason_for_containers()
        if skip:
            rows.append(absolute_row("worker USS per idle container", None, "MB", target="≤ 3 MB",
                                     note=f"skipped: {skip}"))
            return {"name": "memory", "rows": rows, "details": details}
        made = busybox_rootfs()
        assert made is not None
        spec = oci.spec_from_dict(devtools.default_spec(made[1], ["/bin/sleep", "100000"]))
        ctl = SyncClient(agent.sock)
        created = 0
        try:
            for target in counts:
                while created < target:
                    cid = f"m{created}"
                    ctl.call("CreateContainer", container_id=cid, exec_id=cid, OCI=spec)
                    ctl.call("StartContainer", container_id=cid)
                    created += 1
                time.sleep(0.3)
                infos = []
                for w in _workers(agent.pid):
                    try:
                        infos.append(w.memory_full_info())
                    except psutil.Error:
                        pass
                uss = statistics.mean(i.uss for i in infos) / MB
                pss = statistics.mean(i.pss for i in infos) / MB
                rss = statistics.mean(i.rss for i in infos) / MB
                sup_rss = psutil.Process(agent.pid).memory_info().rss / MB
                details[f"containers_{target}"] = {"workers": len(infos), "worker_uss_MB": uss,
                                                   "worker_pss_MB": pss, "worker_rss_MB": rss,
                                                   "supervisor_rss_MB": sup_rss}
                rows.append(absolute_row(f"worker USS, {target} idle container(s)", uss, "MB", target="≤ 3 MB",
                                         at_most=3.0, note=f"PSS {pss:.1f} MB, RSS {rss:.1f} MB; "
                                                           f"supervisor RSS {sup_rss:.1f} MB"))
            for i in range(created):
                ctl.call("RemoveContainer", container_id=f"m{i}")
        finally:
            ctl.close()
    finally:
        agent.stop()
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        remove_cgroup_parent(parent)
    return {"name": "memory", "rows": rows, "details": details}


if __name__ == "__main__":
    cli(run)
