"""Fixtures for the cgroup tests: both write twins, private test parents, probe children.

Every real-cgroup test works under a unique ``kagent-test-<random>`` parent in
each hierarchy it uses; only children forked here are moved into it; the
finalizer thaws, kills those processes (by pid: they are ours, nothing else is
ever moved there), waits for them and removes the directories bottom-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

# Helpers the tests import live in cgroup_support: "from conftest import" finds whichever
# conftest was imported first when several folders are collected together.
from cgroup_support import NO_EXTENSIONS, read, write  # noqa: F401

from kagent import _fast
from kagent.cgroups import fswrite
from kagent.cgroups.paths import Layout

UNIFIED = "/sys/fs/cgroup/unified"


@pytest.fixture(params=["pure", pytest.param("compiled", marks=pytest.mark.skipif(NO_EXTENSIONS, reason="KAGENT_NO_EXTENSIONS=1"))])
def writer(request):
    """Run the test with fswrite bound to one twin, then restore the default."""
    before = fswrite.IMPLEMENTATION
    if request.param == "compiled" and fswrite.COMPILED is None:
        pytest.fail(f"compiled cgroupwrite did not load: {_fast.failures().get('cgroupwrite')}")
    fswrite.select(request.param)
    yield request.param
    fswrite.select(before)


def _thaw_and_kill(directory: str) -> None:
    for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError:
                pass
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        pids = []
    for pid in pids:  # only processes this test moved here
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_tree(top: str, timeout: float = 5.0) -> None:
    if not os.path.isdir(top):
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        _thaw_and_kill(dirpath)
    deadline = time.monotonic() + timeout
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                _thaw_and_kill(dirpath)
                time.sleep(0.02)


@pytest.fixture
def test_parent():
    """A unique parent name; every directory made under it anywhere is removed afterwards."""
    name = "kagent-test-" + uuid.uuid4().hex[:10]
    yield name
    for root in _roots():
        remove_tree(os.path.join(root, name))


# --- probe children -----------------------------------------------------------------------------

PROBE = r"""
import os, sys, time
def reply(text):
    sys.stdout.write(str(text) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "open":
        try:
            os.close(os.open(arg, os.O_RDONLY)); reply("ok")
        except OSError as e:
            reply(f"errno {e.errno}")
    elif cmd == "busy":
        end = time.time() + float(arg)
        while time.time() < end:
            pass
        reply("done")
    elif cmd == "spin":
        reply("spinning")
        while True:
            pass
    elif cmd == "alloc":
        block = bytearray(int(arg) << 20)
        reply(len(block))
    elif cmd == "fork":
        kids = []
        for _ in range(int(arg)):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            kids.append(pid)
        for k in kids:
            os.kill(k, 9)
            os.waitpid(k, 0)
        reply(len(kids))
    elif cmd == "cpus":
        reply(",".join(map(str, sorted(os.sched_getaffinity(0)))))
    elif cmd == "where":
        end = time.time() + float(arg or 0.2)
        seen = set()
        while time.time() < end:
            with open("/proc/self/stat") as f:
                seen.add(int(f.read().rsplit(")", 1)[1].split()[36]))
        reply(",".join(map(str, sorted(seen))))
    elif cmd == "exit":
        break
"""


class Probe:
    """A Python child (no site) that waits for commands on stdin: moved into a cgroup first."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", PROBE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid

    def ask(self, command: str, timeout: float = 10.0) -> str:
        self.send(command)
        return self.reply(timeout)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 10.0) -> str:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"probe {self.pid} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"probe {self.pid} exited (rc {self.proc.poll()})")
        return line.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _roots() -> list[str]:
    layout = Layout.discover()
    roots = set(layout.v1.values())
    if layout.unified:
        roots.add(layout.unified)
    return sorted(roots)


def _thaw_tree(top: str) -> None:
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            path = os.path.join(dirpath, name)
            if os.path.exists(path):
                try:
                    write(path, value)
                except OSError:
                    pass


@pytest.fixture
def probes(test_parent):
    """probes() starts a Probe; at the end the test's cgroups are thawed, then every probe is
    killed and reaped (a frozen v1 task would not die)."""
    started: list[Probe] = []

    def start() -> Probe:
        p = Probe()
        started.append(p)
        return p

    yield start
    for root in _roots():
        _thaw_tree(os.path.join(root, test_parent))
    for p in started:
        p.stop()
