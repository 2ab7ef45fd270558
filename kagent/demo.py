"""`make run`: start kagent on a unix socket, drive it with kagent-ctl, stop it.

Everything it does is printed, so a newcomer sees the agent work end to end
on a fresh machine without a VM or a host runtime: health checks, then (as
root) a real container from a busybox rootfs the demo builds itself — its
output streamed, an exec inside it, and its removal.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

from kagent import devtools, oci


def _ctl(addr: str, *args: str, quiet: bool = False, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kagent.cli.ctl", "--addr", addr, *args]
    shown = " ".join(shlex.quote(a) if len(a) < 80 else "'…'" for a in args)
    print(f"\n$ kagent-ctl --addr {addr} {shown}" + ("  > /dev/null" if quiet else ""), flush=True)
    out = subprocess.DEVNULL if quiet else (subprocess.PIPE if capture else None)
    return subprocess.run(cmd, stdout=out)


def _ensure_busybox() -> bool:
    if devtools.find_busybox():
        return True
    print("busybox is missing: installing Debian's busybox-static", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "busybox-static"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "busybox-static"]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0 and devtools.find_busybox():
            return True
    return bool(devtools.find_busybox())


def _container_demo(addr: str, workdir: str) -> int:
    if os.geteuid() != 0:
        print("\n(not root: skipping the container part — namespaces and mounts need root)")
        return 0
    if not _ensure_busybox():
        print("\ncannot install busybox: skipping the container part")
        return 1
    rootfs = devtools.build_busybox_rootfs(os.path.join(workdir, "rootfs"))
    print(f"\nbuilt a busybox rootfs at {rootfs}")
    script = "echo hello from $(hostname); for i in 1 2 3; do echo tick $i; sleep 0.2; done; sleep 5"
    spec = devtools.default_spec(rootfs, ["/bin/sh", "-c", script], hostname="demo")
    from google.protobuf.json_format import MessageToDict

    request = {"container_id": "demo", "exec_id": "demo",
               "OCI": MessageToDict(oci.spec_from_dict(spec), preserving_proto_field_name=True)}
    req_path = os.path.join(workdir, "create.json")
    with open(req_path, "w") as f:
        json.dump(request, f, indent=1)
    failures = 0
    failures += _ctl(addr, "CreateContainer", "@" + req_path).returncode != 0
    failures += _ctl(addr, "StartContainer", '{"container_id": "demo"}').returncode != 0
    print("\n(the container's output, read with ReadStdout until it has printed three ticks)")
    seen = b""
    while seen.count(b"tick") < 3:
        r = _ctl(addr, "--raw", "ReadStdout", '{"container_id": "demo", "exec_id": "demo", "len": 32768}',
                 capture=True)
        if r.returncode != 0 or not r.stdout:
            failures += 1
            break
        seen += r.stdout
        sys.stdout.write(r.stdout.decode(errors="replace"))
    exec_req = json.dumps({"container_id": "demo", "exec_id": "ps", "process": {
        "Args": ["/bin/ps", "-o", "pid,comm"], "Cwd": "/", "Env": ["PATH=/bin"]}})
    failures += _ctl(addr, "ExecProcess", exec_req).returncode != 0
    failures += _ctl(addr, "--raw", "ReadStdout", '{"container_id": "demo", "exec_id": "ps", "len": 32768}'
                     ).returncode != 0
    failures += _ctl(addr, "WaitProcess", '{"container_id": "demo", "exec_id": "ps"}').returncode != 0
    failures += _ctl(addr, "SignalProcess", '{"container_id": "demo", "exec_id": "", "signal": 9}').returncode != 0
    failures += _ctl(addr, "WaitProcess", '{"container_id": "demo", "exec_id": "demo"}').returncode != 0
    failures += _ctl(addr, "RemoveContainer", '{"container_id": "demo"}').returncode != 0
    return failures


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="kagent-demo-", dir="/tmp")
    sock = os.path.join(workdir, "agent.sock")
    addr = "unix://" + sock
    cmdline = os.path.join(workdir, "cmdline")
    with open(cmdline, "w") as f:
        f.write("console=ttyS0 agent.log=debug agent.hotplug_timeout=5s\n")
    log_path = os.path.join(workdir, "agent.log")
    print(f"starting: kagent --cmdline-file {cmdline} --server-addr {addr}  (logs: {log_path})", flush=True)
    env = {**os.environ, "KAGENT_RUN_DIR": os.path.join(workdir, "run")}
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "kagent", "--cmdline-file", cmdline, "--server-addr", addr],
                                 stdout=log, stderr=log, env=env)
    failures = 0
    try:
        failures += _ctl(addr, "Check").returncode != 0
        failures += _ctl(addr, "Version").returncode != 0
        failures += _ctl(addr, "--repeat", "1000", "--compact", "Check", "{}", quiet=True).returncode != 0
        failures += _ctl(addr, "GetGuestDetails", '{"mem_block_size": true, "mem_hotplug_probe": true}'
                         ).returncode != 0
        print("\n(what kagent does not support answers UNIMPLEMENTED with the reason:)")
        _ctl(addr, "MemAgentMemcgSet", "{}")
        failures += _container_demo(addr, workdir)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            rc = agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            rc = agent.wait()
    print(f"\nkagent stopped with status {rc}; socket removed: {not os.path.exists(sock)}")
    shutil.rmtree(workdir, ignore_errors=True)
    print("demo " + ("OK" if not failures and rc == 0 else f"FAILED ({failures} failed steps)"))
    return 1 if failures or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
