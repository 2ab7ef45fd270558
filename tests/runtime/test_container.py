"""Real containers from OCI specs: start_init / start / exec_process in a throwaway worker."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest
from runtime_harness import communicate, exited, in_worker, run_container

from kagent.runtime.container import SetupError, exec_process, start_init
from kagent.runtime.stdio import make_stdio

pytestmark = pytest.mark.root


def test_output_and_exit_code(spec, bundle, impl):
    r = in_worker(
        run_container, spec(["sh", "-c", "echo out; echo err >&2; exit 3"]), bundle, impl=impl
    )
    assert (exited(r), r["stdout"], r["stderr"]) == (3, "out\n", "err\n")


def test_init_is_pid_1_with_its_hostname(spec, bundle, impl):
    r = in_worker(
        run_container,
        spec(["sh", "-c", "echo $$; hostname; cat /proc/1/cmdline"]),
        bundle,
        impl=impl,
    )
    assert exited(r) == 0
    assert r["stdout"].split("\n")[:2] == ["1", "ctr"]
    assert os.uname().nodename != "ctr"


def test_stdin_round_trip(spec, bundle, impl):
    data = b"hello\n" + bytes(range(256)) * 64
    r = in_worker(run_container, spec(["cat"]), bundle, data, impl=impl)
    assert exited(r) == 0
    assert r["stdout"].encode(errors="surrogateescape") == data


def test_stdin_round_trip_exact(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        h.start()
        out, _ = communicate(parent, b"line one\nline two\n")
        return out, os.waitpid(h.pid, 0)[1]

    out, status = in_worker(body, spec(["cat"]), bundle)
    assert out == b"line one\nline two\n" and status == 0


def test_terminal_with_console_size(spec, bundle, impl):
    s = spec(
        ["sh", "-c", "stty size; test -t 0 && echo tty"],
        terminal=True,
        consoleSize={"height": 40, "width": 120},
    )
    r = in_worker(run_container, s, bundle, terminal=True, impl=impl)
    assert exited(r) == 0
    assert r["stdout"].replace("\r", "").split("\n")[:2] == ["40 120", "tty"]


def test_exit_by_signal(spec, bundle, impl):
    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        h.start()
        time.sleep(0.05)
        os.kill(h.pid, signal.SIGKILL)  # from the worker: PID 1 cannot ignore it
        status = os.waitpid(h.pid, 0)[1]
        parent.close()
        return status

    status = in_worker(body, spec(["sleep", "30"]), bundle, impl=impl)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _start_and_exec(s, b, process, stdin=b""):
    """Start a sleeping init, exec ``process`` in it, return the exec's result and the init's status."""
    init_parent, init_child = make_stdio(False)
    h = start_init(s, b, init_child)
    h.start()
    parent, child = make_stdio(bool(process.get("terminal")))
    pid = exec_process(h.pid, s, process, child)
    out, err = communicate(parent, stdin)
    status = os.waitpid(pid, 0)[1]
    os.kill(h.pid, signal.SIGKILL)
    os.waitpid(h.pid, 0)
    init_parent.close()
    return {"status": status, "stdout": out.decode(), "stderr": err.decode()}


def test_exec_with_own_user_env_cwd(spec, bundle, impl):
    s = spec(["sleep", "30"])
    process = {
        "args": [
            "sh",
            "-c",
            "id -u; id -g; id -G; pwd; echo $FOO; echo $HOME; cat /proc/1/cmdline; echo; umask",
        ],
        "env": ["PATH=/bin", "FOO=bar"],
        "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [10], "umask": 0o027},
        "capabilities": {},
    }
    r = in_worker(_start_and_exec, s, bundle, process, impl=impl)
    assert exited(r) == 0, r
    assert r["stdout"].split("\n")[:8] == [
        "1000",
        "1000",
        "1000 10",
        "/tmp",
        "bar",
        "/home/app",
        "sleep\x0030\x00",
        "0027",
    ]


def test_exec_exit_by_signal_and_stdin(spec, bundle):
    s = spec(["sleep", "30"])
    r = in_worker(
        _start_and_exec,
        s,
        bundle,
        {"args": ["sh", "-c", "read x; echo got $x; kill -TERM $$"], "cwd": "/"},
        b"word\n",
    )
    assert r["stdout"] == "got word\n"
    assert os.WIFSIGNALED(r["status"]) and os.WTERMSIG(r["status"]) == signal.SIGTERM


def test_exec_by_user_name(spec, bundle):
    s = spec(["sleep", "30"])
    process = {
        "args": ["id"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "stringUser": {"uid": "app", "additionalGids": ["wheel"]},
    }
    r = in_worker(_start_and_exec, s, bundle, process)
    assert exited(r) == 0 and r["stdout"].startswith(
        "uid=1000(app) gid=1000(app) groups=10(wheel)"
    ), r


def test_exec_failure_raises_and_leaves_nothing(spec, bundle, impl):
    def body(s, b):
        init_parent, init_child = make_stdio(False)
        h = start_init(s, b, init_child)
        h.start()
        parent, child = make_stdio(False)
        try:
            exec_process(h.pid, s, {"args": ["/no/such/program"], "cwd": "/"}, child)
        except SetupError as exc:
            err = exc
        parent.close()
        kids = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == os.getpid()]
        os.kill(h.pid, signal.SIGKILL)
        os.waitpid(h.pid, 0)
        init_parent.close()
        return err, kids, h.pid

    err, kids, init_pid = in_worker(body, spec(["sleep", "30"]), bundle, impl=impl)
    assert err.step == "exec" and err.errno == errno.ENOENT and "/no/such/program" in str(err)
    assert kids == [str(init_pid)]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_readonly_rootfs(spec, bundle, impl):
    s = spec(["sh", "-c", "touch /x 2>&1; touch /tmp/y && echo tmp-ok"])
    s["root"]["readonly"] = True
    r = in_worker(run_container, s, bundle, impl=impl)
    assert "Read-only file system" in r["stdout"] and "tmp-ok" in r["stdout"]
    assert not os.path.exists(os.path.join(s["root"]["path"], "x"))


def test_masked_paths(spec, bundle, impl):
    # /proc/kcore when the kernel has it (this one may not); /proc/timer_list is never empty
    masked_file = "/proc/kcore" if os.path.exists("/proc/kcore") else "/proc/timer_list"
    assert os.path.getsize(masked_file) > 0 or open(masked_file, "rb").read(1)
    s = spec(
        [
            "sh",
            "-c",
            f"wc -c < {masked_file}; ls -A /sys/firmware | wc -l; ls /sys/firmware/.. | wc -l",
        ]
    )
    s["linux"]["maskedPaths"].append("/proc/timer_list")
    r = in_worker(run_container, s, bundle, impl=impl)
    assert exited(r) == 0, r
    size, firmware, sys_entries = r["stdout"].split()
    assert (size, firmware) == ("0", "0") and int(sys_entries) > 1, r


def test_readonly_paths(spec, bundle):
    s = spec(
        [
            "sh",
            "-c",
            "touch /scratch/x 2>&1; echo 1 > /proc/sys/net/ipv4/ip_forward 2>&1; touch /tmp/ok && echo ok",
        ]
    )
    s["mounts"].append({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"})
    s["linux"]["readonlyPaths"].append("/scratch")
    r = in_worker(run_container, s, bundle)
    assert (r["stdout"] + r["stderr"]).count("Read-only file system") == 2 and r["stdout"].endswith(
        "ok\n"
    ), r


def test_sysctl_in_own_netns(spec, bundle):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host = f.read()
    s = spec(["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/kernel/shmmni"])
    s["linux"]["sysctl"] = {
        "net.ipv4.ip_forward": "1" if host.strip() == "0" else "0",
        "kernel.shmmni": "1234",
    }
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0
    assert r["stdout"].split() == [s["linux"]["sysctl"]["net.ipv4.ip_forward"], "1234"]
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == host


def test_sysctl_outside_a_namespace_is_refused(spec, bundle):
    s = spec(["true"])
    s["linux"]["sysctl"] = {"kernel.pid_max": "4096"}
    with pytest.raises(SetupError, match="not namespaced"):
        in_worker(run_container, s, bundle)


def test_capability_drop(spec, bundle, impl):
    def run_both(s_without, s_with, b):
        return run_container(s_without, b), run_container(s_with, b)

    # ping_group_range "1 0" (no ICMP datagram sockets) makes busybox ping need a raw socket
    script = (
        "grep CapEff /proc/self/status; ip link set lo up 2>&1; "
        "ping -c1 -W1 127.0.0.1 2>&1 | grep -E 'received|denied|not permitted'"
    )
    without = spec(["sh", "-c", script])
    caps = ["CAP_NET_ADMIN", "CAP_KILL"]
    without["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    with_raw = spec(["sh", "-c", script])
    with_raw["process"]["capabilities"] = {
        k: caps + ["CAP_NET_RAW"] for k in ("bounding", "effective", "permitted")
    }
    for s in (without, with_raw):
        s["linux"]["sysctl"] = {"net.ipv4.ping_group_range": "1 0"}
    r1, r2 = in_worker(run_both, without, with_raw, bundle, impl=impl)
    assert r1["stdout"].startswith(f"CapEff:\t{(1 << 12) | (1 << 5):016x}\n"), r1
    assert "ermission denied" in r1["stdout"] or "not permitted" in r1["stdout"], r1
    assert r2["stdout"].startswith(f"CapEff:\t{(1 << 12) | (1 << 13) | (1 << 5):016x}\n"), r2
    assert "1 packets received" in r2["stdout"], r2
    assert "received" not in r1["stdout"]


def test_unavailable_capability_is_dropped_with_a_warning(spec, bundle):
    s = spec(["true"])
    held = _held_caps()
    s["process"]["capabilities"]["bounding"].append("CAP_SYS_RESOURCE")
    s["process"]["capabilities"]["bounding"].append("CAP_NO_SUCH_THING")
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0
    assert any("CAP_NO_SUCH_THING" in w for w in r["warnings"])
    if not held >> 24 & 1:  # this machine's root lacks CAP_SYS_RESOURCE
        assert any("CAP_SYS_RESOURCE" in w for w in r["warnings"])


def _held_caps() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("CapPrm")).split()[1], 16)


def test_seccomp_errno(spec, bundle, impl):
    s = spec(
        [
            "sh",
            "-c",
            "mkdir /tmp/x 2>&1; kill -0 $$ 2>&1 || echo kill0-denied; kill -CONT $$ && echo cont-ok",
        ]
    )
    s["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [
            "SCMP_ARCH_X86_64",
            "SCMP_ARCH_X86",
            "SCMP_ARCH_X32",
            "SCMP_ARCH_AARCH64",
        ],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"},
        ],
    }
    r = in_worker(run_container, s, bundle, impl=impl)
    out = r["stdout"]
    assert "Operation not permitted" in out and "kill0-denied" in out and "cont-ok" in out, r


def test_seccomp_without_no_new_privs(spec, bundle):
    s = spec(
        ["sh", "-c", "mkdir /tmp/x 2>&1; grep -E 'Seccomp:|NoNewPrivs' /proc/self/status"],
        noNewPrivileges=False,
    )
    s["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
    }
    r = in_worker(run_container, s, bundle)
    assert (
        "Operation not permitted" in r["stdout"]
        and "NoNewPrivs:\t0" in r["stdout"]
        and "Seccomp:\t2" in r["stdout"]
    ), r


@pytest.mark.parametrize("target", ["/", "../../../../../../../../"])
def test_symlink_escape_stays_in_rootfs(spec, bundle, rootfs, target):
    evil = os.path.join(rootfs, "etc", "evil")
    os.symlink(target, evil)
    src = os.path.join(bundle, "marker")
    os.makedirs(src)
    with open(os.path.join(src, "m"), "w") as f:
        f.write("inside\n")
    try:
        s = spec(["cat", "/kagent-escape-test/m"])
        s["mounts"].append(
            {
                "destination": "/etc/evil/kagent-escape-test",
                "type": "bind",
                "source": src,
                "options": ["rbind", "ro"],
            }
        )
        r = in_worker(run_container, s, bundle)
        assert exited(r) == 0 and r["stdout"] == "inside\n", r
        assert not os.path.exists("/kagent-escape-test")
    finally:
        os.unlink(evil)
        if os.path.isdir(os.path.join(rootfs, "kagent-escape-test")):
            os.rmdir(os.path.join(rootfs, "kagent-escape-test"))


def test_bind_mount_ro(spec, bundle, rootfs):
    src = os.path.join(bundle, "shared")
    os.makedirs(src)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("data\n")
    s = spec(["sh", "-c", "cat /data/f; touch /data/g 2>&1"])
    s["mounts"].append(
        {
            "destination": "/data",
            "type": "bind",
            "source": "shared",
            "options": ["rbind", "ro", "nosuid"],
        }
    )
    r = in_worker(run_container, s, bundle)
    assert r["stdout"].startswith("data\n") and "Read-only file system" in r["stdout"], r


def test_setup_error_names_step_and_path(spec, bundle, impl):
    def body(s, b):
        parent, child = make_stdio(False)
        try:
            start_init(s, b, child)
        except SetupError as exc:
            err = exc
        finally:
            parent.close()
        time.sleep(0.05)
        left = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == os.getpid()]
        return err, left

    s = spec(["true"])
    s["mounts"].append(
        {
            "destination": "/data",
            "type": "bind",
            "source": "/nonexistent-kagent-src",
            "options": ["rbind"],
        }
    )
    err, left = in_worker(body, s, bundle, impl=impl)
    assert err.path == "/nonexistent-kagent-src" and err.errno == errno.ENOENT
    assert "mount bind /nonexistent-kagent-src" in err.step
    assert "[Errno 2] No such file or directory" in str(err)
    assert left == []


def test_abort_before_start(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        alive = os.path.exists(f"/proc/{h.pid}")
        h.abort()
        parent.close()
        return alive, os.path.exists(f"/proc/{h.pid}")

    assert in_worker(body, spec(["true"]), bundle) == (True, False)


def test_user_namespace_with_mappings(spec, bundle):
    s = spec(
        [
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; id -u; echo $$; touch /tmp/f && ls -n /tmp/f; "
            "test -c /dev/null && echo > /dev/null && echo null-ok",
        ]
    )
    s["linux"]["namespaces"].append({"type": "user"})
    s["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    s["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0, r
    lines = [" ".join(line.split()) for line in r["stdout"].splitlines()]
    assert lines[:4] == ["0 100000 65536", "0 100000 65536", "0", "1"], r
    assert lines[4].split()[2:4] == ["0", "0"] and lines[5] == "null-ok", r


def test_user_namespace_needs_mappings(spec, bundle):
    s = spec(["true"])
    s["linux"]["namespaces"].append({"type": "user"})
    with pytest.raises(SetupError, match="needs linux.uidMappings"):
        in_worker(run_container, s, bundle)


def test_start_after_the_init_died(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        os.kill(h.pid, signal.SIGKILL)
        time.sleep(0.05)
        try:
            h.start()
        except SetupError as exc:
            return exc
        finally:
            parent.close()

    err = in_worker(body, spec(["true"]), bundle)
    assert (
        isinstance(err, SetupError) and err.step == "start" and "killed by signal 9" in str(err)
    ), err


def test_on_forked_failure_leaves_nothing(spec, bundle):
    def body(s, b):
        def boom(pid):
            raise RuntimeError(f"no cgroup for {pid}")

        parent, child = make_stdio(False)
        try:
            start_init(s, b, child, on_forked=boom)
        except RuntimeError as exc:
            err = str(exc)
        parent.close()
        return err, [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == os.getpid()]

    err, left = in_worker(body, spec(["true"]), bundle)
    assert err.startswith("no cgroup for ") and left == []


def test_join_netns_by_path(spec, bundle):
    sleeper = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        target = f"/proc/{sleeper.pid}/ns/net"
        while (
            os.readlink(target) == os.readlink("/proc/self/ns/net") and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        s = spec(["readlink", "/proc/self/ns/net"])
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "network"]
        s["linux"]["namespaces"].append({"type": "network", "path": target})
        r = in_worker(run_container, s, bundle)
        assert exited(r) == 0 and r["stdout"].strip() == os.readlink(target)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_prestart_hook_gets_state(spec, bundle):
    out = os.path.join(bundle, "state.json")
    s = spec(["true"])
    s["annotations"] = {"a": "b"}
    s["hooks"] = {
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {out}"], "timeout": 10}]
    }
    r = in_worker(run_container, s, bundle, container_id="c1")
    assert exited(r) == 0
    import json

    with open(out) as f:
        st = json.load(f)
    assert st["id"] == "c1" and st["status"] == "creating" and st["bundle"] == bundle
    assert st["annotations"] == {"a": "b"} and st["pid"] > 1


def test_hook_timeout_fails_creation(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        try:
            start_init(s, b, child)
        except SetupError as exc:
            return exc
        finally:
            parent.close()

    s = spec(["true"])
    s["hooks"] = {"createRuntime": [{"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}]}
    t0 = time.monotonic()
    err = in_worker(body, s, bundle)
    assert (
        isinstance(err, SetupError)
        and "timed out after 1s" in str(err)
        and "createRuntime" in err.step
    )
    assert time.monotonic() - t0 < 4


def test_start_and_poststart_hooks(spec, bundle):
    seen = os.path.join(bundle, "seen")
    s = spec(["sh", "-c", "cat /hook-ran"])
    s["hooks"] = {
        "createContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", f"echo createContainer >> {seen}"]}
        ],
        "startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo start-hook > /hook-ran"]}
        ],
        "poststart": [
            {"path": "/bin/sh", "args": ["sh", "-c", f"echo poststart >> {seen}"]},
            {"path": "/bin/false"},
        ],
    }
    s["mounts"].append(
        {
            "destination": "/hook-ran",
            "type": "bind",
            "source": os.path.join(bundle, "hr"),
            "options": ["bind"],
        }
    )
    open(os.path.join(bundle, "hr"), "w").close()
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0 and r["stdout"] == "start-hook\n", r
    with open(seen) as f:
        assert f.read() == "createContainer\npoststart\n"
    assert any("poststart[1] /bin/false" in w for w in r["warnings"])


def test_process_attributes(spec, bundle):
    s = spec(
        [
            "sh",
            "-c",
            "ulimit -n; cat /proc/self/oom_score_adj; grep NoNewPrivs /proc/self/status; umask; "
            "ls -ln /dev/kagent-null",
        ],
        oomScoreAdj=500,
        rlimits=[{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}],
        user={"uid": 0, "gid": 0, "umask": 0o077},
        apparmorProfile="kagent-test-profile",
    )
    s["linux"]["devices"] = [
        {
            "path": "/dev/kagent-null",
            "type": "c",
            "major": 1,
            "minor": 3,
            "fileMode": 0o600,
            "uid": 1000,
            "gid": 1000,
        }
    ]
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0, r
    lines = r["stdout"].splitlines()
    assert lines[:4] == ["256", "500", "NoNewPrivs:\t1", "0077"], r
    assert lines[4].split()[:4] == ["crw-------", "1", "1000", "1000"], r


def test_no_ignored_or_blocked_signals_leak(spec, bundle):
    """Python ignores SIGPIPE and SIGXFSZ; the container must get the defaults back."""
    r = in_worker(run_container, spec(["grep", "-E", "Sig(Ign|Blk)", "/proc/self/status"]), bundle)
    assert r["stdout"].splitlines() == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"], r


def test_worker_pid_namespace_is_restored(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        after = os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
        in_new = os.readlink(f"/proc/{h.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        h.start()
        communicate(parent)
        os.waitpid(h.pid, 0)
        return after, in_new

    assert in_worker(body, spec(["true"]), bundle) == (True, True)


def test_on_forked_runs_before_the_child_sets_up(spec, bundle):
    def body(s, b):
        seen = []

        def on_forked(pid):
            seen.append(os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"))

        parent, child = make_stdio(False)
        h = start_init(s, b, child, on_forked=on_forked)
        h.start()
        p2, c2 = make_stdio(False)
        pid = exec_process(h.pid, s, {"args": ["true"], "cwd": "/"}, c2, on_forked=on_forked)
        os.waitpid(pid, 0)
        p2.close()
        communicate(parent)
        os.waitpid(h.pid, 0)
        return seen

    assert in_worker(body, spec(["sleep", "0.2"]), bundle) == [True, True]


def _userns_spec(spec, args):
    s = spec(args)
    s["linux"]["namespaces"].append({"type": "user"})
    s["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    s["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    return s


def test_exec_into_user_namespace_container(spec, bundle, impl):
    s = _userns_spec(spec, ["sleep", "30"])
    process = {
        "args": ["sh", "-c", "id -u; cat /proc/self/uid_map; cat /proc/1/cmdline"],
        "cwd": "/",
        "user": {"uid": 1000, "gid": 1000},
        "env": ["PATH=/bin"],
    }
    r = in_worker(_start_and_exec, s, bundle, process, impl=impl)
    assert exited(r) == 0, r
    lines = r["stdout"].splitlines()
    assert (
        lines[0] == "1000"
        and lines[1].split() == ["0", "200000", "65536"]
        and lines[2] == "sleep\x0030\x00"
    ), r


def test_exec_with_terminal(spec, bundle):
    s = spec(["sleep", "30"])
    process = {
        "args": ["sh", "-c", "stty size; test -t 0 && echo has-tty"],
        "cwd": "/",
        "terminal": True,
        "consoleSize": {"height": 24, "width": 100},
    }
    r = in_worker(_start_and_exec, s, bundle, process)
    assert r["stdout"].replace("\r", "").splitlines()[:2] == ["24 100", "has-tty"], r


def test_join_pid_namespace_by_path(spec, bundle):
    sleeper = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        inner = None
        while inner is None and time.monotonic() < deadline:
            kids = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == sleeper.pid]
            inner = int(kids[0]) if kids else None
            time.sleep(0.01)
        s = spec(["sh", "-c", "echo $$; cat /proc/1/cmdline"])
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "pid"]
        s["linux"]["namespaces"].append({"type": "pid", "path": f"/proc/{inner}/ns/pid"})
        r = in_worker(run_container, s, bundle)
        pid, cmdline = r["stdout"].splitlines()
        assert int(pid) > 1 and cmdline == "sleep\x0060\x00", r
    finally:
        sleeper.kill()
        sleeper.wait()


def test_initramfs_root_uses_move_and_chroot(spec, bundle, impl):
    """On an initramfs guest pivot_root is refused; MS_MOVE + chroot is used (forced here)."""
    from kagent.runtime import rootfs as rootfs_mod

    def body(s, b):
        rootfs_mod.is_initramfs = lambda: True  # only in this throwaway worker
        return run_container(s, b)

    s = spec(
        ["sh", "-c", "cat /etc/passwd | head -1; ls /proc/1/root/ >/dev/null && echo ok; echo $$"]
    )
    s["root"]["readonly"] = True
    r = in_worker(body, s, bundle, impl=impl)
    assert exited(r) == 0 and r["stdout"].splitlines() == [
        "root:x:0:0:root:/root:/bin/sh",
        "ok",
        "1",
    ], r


def _has_cap(number: int) -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> number & 1)


def test_oom_score_adj_in_a_user_namespace_container(spec, bundle):
    """oom_score_adj is set before the container's own user namespace exists: lowering it needs
    CAP_SYS_RESOURCE in the initial user namespace (EACCES when it was set after the unshare).
    This machine's root lacks CAP_SYS_RESOURCE (bit 24 of CapEff): here a raised score is
    checked instead, which any process may ask."""
    value = -500 if _has_cap(24) else 500
    s = _userns_spec(spec, ["cat", "/proc/self/oom_score_adj"])
    s["process"]["oomScoreAdj"] = value
    r = in_worker(run_container, s, bundle)
    assert exited(r) == 0, r
    assert r["stdout"].strip() == str(value), r
