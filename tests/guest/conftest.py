"""Fixtures for the guest-level RPC tests: a fake sysfs tree (helpers in guest_harness.py).

After every test the host's mount table must be unchanged: the tests mount only in
namespaces of their own.
"""

from __future__ import annotations

import pytest


def _mount_table() -> list[tuple[str, ...]]:
    # Network namespaces pinned under /run/netns belong to whatever else runs on the
    # machine (other suites' netns fixtures): not ours to judge.
    with open("/proc/self/mountinfo") as f:
        rows = (tuple(line.split()[4:6]) for line in f)
        return sorted(r for r in rows if not r[0].startswith("/run/netns/"))


@pytest.fixture(autouse=True)
def host_mounts_unchanged():
    before = _mount_table()
    yield
    assert _mount_table() == before, "the host's mount table changed"


@pytest.fixture
def fake_root(tmp_path):
    """A root with sys/devices/system/memory (block size 0x8000000, a probe file) and
    proc/self/status with a Seccomp line."""
    mem = tmp_path / "sys/devices/system/memory"
    mem.mkdir(parents=True)
    (mem / "block_size_bytes").write_text("8000000\n")
    (mem / "probe").write_text("")
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/status").write_text("Name:\tkagent\nSeccomp:\t0\nSeccomp_filters:\t0\n")
    return tmp_path
