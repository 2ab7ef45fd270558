"""kagent and kagent-ctl as real processes, as a developer drives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from support import kagent_cmd, kagent_ctl_cmd


def ctl(addr: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(kagent_ctl_cmd("--addr", addr, *args), capture_output=True, text=True, timeout=timeout)


def test_check_version_and_unimplemented(agent_process):
    agent = agent_process()
    r = ctl(agent.addr, "Check")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"status": "SERVING"}
    r = ctl(agent.addr, "Version", "{}")
    assert json.loads(r.stdout)["grpc_version"] == "0.0.1"
    r = ctl(agent.addr, "MemAgentMemcgSet", '{}')
    assert r.returncode == 1
    assert "UNIMPLEMENTED" in r.stderr and "mem-agent" in r.stderr


def test_request_from_file_repeat_and_compact(agent_process, tmp_sock_dir):
    agent = agent_process()
    req = os.path.join(tmp_sock_dir, "req.json")
    with open(req, "w") as f:
        json.dump({"service": "anything"}, f)
    r = ctl(agent.addr, "--repeat", "5", "--compact", "Check", "@" + req)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['{"status":"SERVING"}'] * 5
    assert "5/5 ok" in r.stderr


def test_usage_errors(agent_process):
    agent = agent_process()
    r = ctl(agent.addr, "NoSuchCall")
    assert r.returncode == 2 and "unknown RPC" in r.stderr
    r = ctl(agent.addr, "Check", "{not json")
    assert r.returncode == 2 and "bad request" in r.stderr
    r = ctl(agent.addr, "Check", '{"no_such_field": 1}')
    assert r.returncode == 2 and "no_such_field" in r.stderr
    r = ctl("unix:///nonexistent/agent.sock", "--connect-timeout", "0.2", "Check")
    assert r.returncode == 3 and "cannot connect" in r.stderr


def test_list_names_every_rpc():
    r = subprocess.run(kagent_ctl_cmd("list"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert len(names) == 44 and "CreateContainer" in names and "Check" in names


def test_print_config_and_warnings(tmp_sock_dir):
    cmdline = os.path.join(tmp_sock_dir, "cmdline")
    with open(cmdline, "w") as f:
        f.write("console=ttyS0 agent.log=debug agent.hotplug_timeout=1m30s agent.container_pipe_size=-4 "
                "agent.bogus=1\n")
    r = subprocess.run(kagent_cmd("--cmdline-file", cmdline, "--print-config"), capture_output=True, text=True,
                       timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("KATA_AGENT_")})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    for key in ("log_level", "dev_mode", "debug_console", "debug_console_vport", "log_vport", "server_addr",
                "tracing", "hotplug_timeout", "unified_cgroup_hierarchy", "container_pipe_size",
                "passfd_listener_port", "config_file", "warnings"):
        assert key in cfg
    assert cfg["log_level"] == "debug"
    assert cfg["hotplug_timeout"] == 90.0
    assert cfg["container_pipe_size"] == 0
    assert cfg["server_addr"] == "vsock://-1:1024"
    assert any("container_pipe_size" in w for w in cfg["warnings"])
    assert any("agent.bogus" in w for w in cfg["warnings"])


def test_sigterm_graceful_shutdown_removes_socket_and_zygote(agent_process):
    agent = agent_process()
    assert ctl(agent.addr, "Check").returncode == 0
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(agent.proc.pid)], capture_output=True,
                              text=True).stdout
    assert "kagent: zygote" in children
    zygote_pid = int(children.split()[0])
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    assert not os.path.exists(agent.sock)
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{zygote_pid}")
    log = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    assert any(rec["msg"] == "stopping" and "SIGTERM" in rec.get("reason", "") for rec in log)
    for rec in log:
        assert rec["name"] == "kata-agent" and rec["source"] == "agent" and "subsystem" in rec


def test_agent_survives_garbage_and_keeps_serving(agent_process):
    import socket

    agent = agent_process()
    assert ctl(agent.addr, "Check").returncode == 0
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.sock)
    s.sendall(os.urandom(4096))
    s.close()
    assert ctl(agent.addr, "Check").returncode == 0
    assert agent.proc.poll() is None


def test_unusable_address_exits_with_clear_error(tmp_sock_dir):
    cmdline = os.path.join(tmp_sock_dir, "cmdline")
    with open(cmdline, "w") as f:
        f.write("quiet\n")
    r = subprocess.run(kagent_cmd("--cmdline-file", cmdline, "--server-addr", "unix:///proc/nope/x.sock"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "cannot listen" in r.stderr
