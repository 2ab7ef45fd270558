"""Regenerate tests/cgroups/fixtures from this machine's cgroups (root; run by hand).

    .venv/bin/python tests/cgroups/capture_fixtures.py

Creates kagent-test-capture-<random> in each v1 hierarchy and under the cgroup2
mount, runs a child there (a busy loop, a 32 MiB allocation, 1 MiB of O_DIRECT
writes to a temp file, a few forks), freezes it for the freezer files, then
copies the files the stats parsers read into fixtures/v1 and fixtures/v2 and
removes everything it made.  Files a kernel cannot produce here (v2 memory,
io and hugetlb, since this machine's cgroup2 offers only hugetlb at the top)
are written by hand in fixtures/v2 from the kernel's documentation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
V1 = {
    "cpuacct": ["cpuacct.usage", "cpuacct.usage_percpu", "cpuacct.stat"],
    "cpu": ["cpu.stat", "cpu.shares", "cpu.cfs_quota_us"],
    "memory": ["memory.stat", "memory.use_hierarchy", "memory.usage_in_bytes", "memory.max_usage_in_bytes",
               "memory.failcnt", "memory.limit_in_bytes", "memory.memsw.usage_in_bytes",
               "memory.memsw.max_usage_in_bytes", "memory.memsw.failcnt", "memory.memsw.limit_in_bytes",
               "memory.kmem.usage_in_bytes", "memory.kmem.max_usage_in_bytes", "memory.kmem.failcnt",
               "memory.kmem.limit_in_bytes", "memory.oom_control"],
    "pids": ["pids.current", "pids.max", "pids.events"],
    "blkio": ["blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_serviced_recursive",
              "blkio.throttle.read_bps_device"],
    "freezer": ["freezer.state"],
    "devices": ["devices.list"],
}
V2 = ["cgroup.events", "cgroup.stat", "cpu.stat", "cgroup.freeze"]
WORK = r"""
import os, sys, time
sys.stdin.readline()
t = time.time()
while time.time() - t < 0.3:
    pass
block = bytearray(32 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
import mmap
buf = mmap.mmap(-1, 65536)
for _ in range(16):
    os.write(fd, buf)
os.close(fd)
for _ in range(3):
    kid = os.fork()
    if kid == 0:
        os._exit(0)
    os.waitpid(kid, 0)
print("done", flush=True)
sys.stdin.readline()
"""


def main() -> None:
    name = "kagent-test-capture-" + uuid.uuid4().hex[:8]
    roots = {c: f"/sys/fs/cgroup/{c}" for c in V1}
    dirs = {c: os.path.join(r, name) for c, r in roots.items()}
    unified = os.path.join("/sys/fs/cgroup/unified", name)
    tmp = tempfile.mkdtemp(dir="/var/tmp")
    child = None
    try:
        for d in [*dirs.values(), unified]:
            os.mkdir(d)
        with open(os.path.join(dirs["pids"], "pids.max"), "w") as f:
            f.write("64")
        with open(os.path.join(dirs["memory"], "memory.limit_in_bytes"), "w") as f:
            f.write(str(256 << 20))
        with open(os.path.join(dirs["blkio"], "blkio.throttle.read_bps_device"), "w") as f:
            f.write("254:0 10485760")
        child = subprocess.Popen([sys.executable, "-S", "-c", WORK, os.path.join(tmp, "direct")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for d in [*dirs.values(), unified]:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(child.pid))
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        with open(os.path.join(dirs["freezer"], "freezer.state"), "w") as f:
            f.write("FROZEN")
        with open(os.path.join(unified, "cgroup.freeze"), "w") as f:
            f.write("1")
        for c, names in V1.items():
            for n in names:
                shutil.copyfile(os.path.join(dirs[c], n), os.path.join(HERE, "v1", n))
        for n in V2:
            shutil.copyfile(os.path.join(unified, n), os.path.join(HERE, "v2", "real." + n))
    finally:
        for path, value in ((os.path.join(dirs["freezer"], "freezer.state"), "THAWED"),
                            (os.path.join(unified, "cgroup.freeze"), "0")):
            if os.path.exists(path):
                with open(path, "w") as f:
                    f.write(value)
        if child is not None:
            child.kill()
            child.wait()
        for d in [*dirs.values(), unified]:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
