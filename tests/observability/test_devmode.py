"""Developer mode: the agent's set-up lets it (and what it forks) dump core.

The core goes where /proc/sys/kernel/core_pattern says; here it is "core" (a file in the
dumping process's working directory), so the test runs the child in a temporary cwd.  The
test never changes core_pattern (a host-wide setting).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import pytest
from support import REPO


def _core_pattern() -> str:
    with open("/proc/sys/kernel/core_pattern") as f:
        return f.read().strip()


needs_plain_cores = pytest.mark.skipif(
    _core_pattern().startswith("|") or "/" in _core_pattern()
    or resource.getrlimit(resource.RLIMIT_CORE)[1] == 0,
    reason="core_pattern pipes cores elsewhere (or points to a directory), or the hard RLIMIT_CORE is 0",
)

CHILD = textwrap.dedent("""
    import os, resource, sys
    sys.path.insert(0, {repo!r})
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if sys.argv[1] == "devmode":
        from kagent.__main__ import allow_core_dumps
        problems = allow_core_dumps()
        assert not problems, problems
    pid = os.fork()          # a child forked from the agent's set-up
    if pid == 0:
        os.abort()
    _, status = os.waitpid(pid, 0)
    print(pid, os.WCOREDUMP(status), os.WTERMSIG(status))
""")


def _run(mode: str, cwd: str) -> tuple[int, bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=REPO), mode], cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid, dumped, sig = out.stdout.split()
    return int(pid), dumped == "True", int(sig)


def _cores(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n == "core" or n.startswith("core.")]


@needs_plain_cores
def test_devmode_child_abort_leaves_a_core_file(tmp_path):
    pid, dumped, sig = _run("devmode", str(tmp_path))
    assert sig == 6 and dumped  # SIGABRT, with a core
    cores = _cores(str(tmp_path))
    assert cores, f"no core file in {tmp_path}: {os.listdir(tmp_path)}"
    assert cores[0] in ("core", f"core.{pid}")
    with open(tmp_path / cores[0], "rb") as f:
        assert f.read(4) == b"\x7fELF"  # an ELF core image
    for name in cores:
        os.unlink(tmp_path / name)  # they are large


@needs_plain_cores
def test_without_devmode_no_core(tmp_path):
    _, dumped, sig = _run("plain", str(tmp_path))
    assert sig == 6 and not dumped
    assert _cores(str(tmp_path)) == []


def test_devmode_implies_debug_logging():
    from kagent import config

    assert config.load(cmdline="agent.devmode", environ={}).log_level == "debug"
    assert config.load(cmdline="agent.devmode agent.log=trace", environ={}).log_level == "trace"


def test_agent_in_devmode_may_dump_core(agent_process, tmp_sock_dir):
    """The real agent started with agent.devmode: RLIMIT_CORE raised to its hard limit (the
    dumpable flag cannot be read from outside; the fork test above shows its effect)."""
    import socket
    import time

    with open(os.path.join(tmp_sock_dir, "cmdline"), "w") as f:
        f.write("quiet agent.devmode\n")
    agent = agent_process()
    deadline = time.monotonic() + 20
    while not os.path.exists(agent.sock) and time.monotonic() < deadline:
        assert agent.proc.poll() is None, agent.log()
        time.sleep(0.05)
    assert os.path.exists(agent.sock), agent.log()
    with open(f"/proc/{agent.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max core file size"))
    soft, hard = line.split()[4:6]
    assert soft == hard, line
    # agent.devmode implies debug logs: a connection is logged at debug level.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(agent.sock)
    deadline = time.monotonic() + 10
    while '"level":"debug"' not in agent.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"level":"debug"' in agent.log()
