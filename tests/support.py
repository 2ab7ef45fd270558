"""Helpers shared by the test modules (importable as ``support``; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kagent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kagent", *args]


def kagent_ctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kagent.cli.ctl", *args]


class AgentProcess:
    """A kagent started as a real process on a unix socket, stopped and reaped at the end."""

    def __init__(self, sock_dir: str, *extra: str, env: dict | None = None):
        self.sock = os.path.join(sock_dir, "agent.sock")
        self.addr = "unix://" + self.sock
        cmdline = os.path.join(sock_dir, "cmdline")
        if not os.path.exists(cmdline):
            with open(cmdline, "w") as f:
                f.write("console=ttyS0 quiet\n")
        self.log_path = os.path.join(sock_dir, "agent.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            kagent_cmd("--cmdline-file", cmdline, "--server-addr", self.addr, *extra),
            stdout=self._log, stderr=self._log, env={**os.environ, **(env or {})}, cwd=REPO,
        )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def busybox_rootfs(prefix: str):
    """A session-long busybox rootfs for a test folder's ``rootfs`` fixture (skips without busybox)."""
    import contextlib
    import shutil
    import tempfile

    import pytest

    from kagent import devtools

    @contextlib.contextmanager
    def made():
        if devtools.find_busybox() is None:
            pytest.skip("busybox is not installed (apt-get install busybox-static)")
        top = tempfile.mkdtemp(prefix=prefix)
        os.chmod(top, 0o755)
        try:
            yield devtools.build_busybox_rootfs(os.path.join(top, "rootfs"))
        finally:
            shutil.rmtree(top, ignore_errors=True)

    return made()
