"""Run kagent.init as PID 1 of private namespaces, outside any VM (for test_init_pid1.py).

    python init_probe.py WORKDIR END        END: "exit0" | "exit3" | "sigkill"

This process unshares mount, PID, UTS, IPC and network namespaces and forks: the
child is PID 1 there and runs kagent.init on WORKDIR/root (prepare, boot).  The
supervisor that boot() forks checks what init did, exercises the reaper, writes
WORKDIR/result.json and ends as END says.  This process prints PID 1's wait
status as JSON.

Mocked here, because the real thing cannot be used safely on a shared machine:
devtmpfs is one instance for the whole kernel (the host's /dev), so a tmpfs
stands in for it; cgroups are not mounted (a cgroup hierarchy's root is
host-wide too); no kernel module is loaded (this kernel has no module support).
The VM suite covers those for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from kagent import config as kconfig
from kagent import init
from kagent import log as klog
from kagent.runtime import syscalls
from kagent.runtime.syscalls import MS_NOSUID, MS_PRIVATE, MS_REC

MOUNTS = tuple(init.Mount("tmpfs", "dev", "tmpfs", MS_NOSUID, "mode=0755") if m.fstype == "devtmpfs" else m
               for m in init.BASE_MOUNTS)
HOSTNAME = "probe-guest"


def _mounted(root: str) -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        from kagent.runtime import mountinfo

        return {m.mount_point: m.fstype for m in mountinfo.parse(f.read()) if m.mount_point.startswith(root)}


def _orphans(n: int) -> list[int]:
    """Make ``n`` orphans: each middle process exits at once, its child lives 0.2 s more."""
    pids = []
    for _ in range(n):
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.2)
                os._exit(0)
            os.write(w, str(grandchild).encode())
            os._exit(0)
        os.close(w)
        pids.append(int(os.read(r, 32)))
        os.close(r)
        os.waitpid(middle, 0)  # ours: we reap it; its child goes to PID 1
    return pids


def agent_checks(root: str, workdir: str) -> dict:
    out: dict = {"pid": os.getpid(), "ppid": os.getppid(), "sid_is_self": os.getsid(0) == os.getpid(),
                 "init_mode": init.is_init_mode(), "PATH": os.environ.get("PATH")}
    out["mounts"] = _mounted(root)
    out["ptmx"] = os.readlink(os.path.join(root, "dev/ptmx"))
    out["hostname"] = socket.gethostname()
    with open(os.path.join(root, "sys/class/net/lo/flags")) as f:
        out["lo_up"] = bool(int(f.read(), 16) & 1)
    again = init.mount_base(root, MOUNTS)
    out["second_prepare"] = {"mounted": again.mounted, "skipped": len(again.skipped)}

    # The reaper takes the orphans, and never the status of a child someone waits for.
    codes: list[int] = []

    def run_commands() -> None:
        for _ in range(15):
            codes.append(subprocess.run(["/bin/sh", "-c", "exit 7"], check=False).returncode)

    threads = [threading.Thread(target=run_commands) for _ in range(3)]
    for t in threads:
        t.start()
    orphans = _orphans(20)
    for t in threads:
        t.join()
    time.sleep(1.0)
    out["command_codes"] = sorted(set(codes))
    out["commands"] = len(codes)
    out["orphans_left"] = [p for p in orphans if os.path.exists(os.path.join(root, "proc", str(p)))]
    with open(os.path.join(root, "proc/1/comm")) as f:  # named after the fork: read it last
        out["pid1_comm"] = f.read().strip()
    return out


def pid1(workdir: str, end: str, parent_ns: str) -> None:
    assert os.getpid() == 1 and os.readlink("/proc/self/ns/pid") != parent_ns, "not in a new PID namespace"
    root = os.path.join(workdir, "root")
    report = init.prepare(root, mounts=MOUNTS, modules=[])
    cfg = kconfig.load(cmdline="")
    klog.setup("debug")
    init.boot(cfg, report, root=root, cgroups=False)
    # from here on: the supervisor, PID 1's child
    try:
        result = agent_checks(root, workdir)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = {"error": repr(exc)}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
    if end == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0 if end == "exit0" else 3)


def main() -> int:
    workdir, end = sys.argv[1], sys.argv[2]
    root = os.path.join(workdir, "root")
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc/hostname"), "w") as f:
        f.write(HOSTNAME + "\n")
    parent_ns = os.readlink("/proc/self/ns/pid")
    syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWUTS
                     | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWNET)
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks out
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            pid1(workdir, end, parent_ns)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exitcode": os.waitstatus_to_exitcode(status)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
