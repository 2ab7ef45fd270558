"""Fixtures for the runtime tests: a busybox rootfs, bundles, specs, both syscall twins.

After every test: no process of ours is left, the host's mount table is
unchanged and temp dirs are gone.
"""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import psutil
import pytest
from runtime_harness import make_spec

from kagent import _fast
from kagent.runtime import syscalls

BUSYBOX = "/usr/bin/busybox"
IMPLEMENTATIONS = ["compiled", "pure"]


# --- the host must look the same after every test ---------------------------------------------


_OURS = os.path.join(tempfile.gettempdir(), "kagent-")
_SYSTEM = ("/", "/proc", "/sys", "/dev", "/tmp")


def _ours_to_watch(mount_point: str) -> bool:
    """Where a leaked container mount would show: our temp dirs, or the system trees a
    container mounts its own copies of.  (Other engineers' tests share this machine and
    mount elsewhere, e.g. /run/netns, at the same time.)"""
    return (
        mount_point.startswith(_OURS)
        or mount_point in _SYSTEM
        or mount_point.startswith(("/proc/", "/sys/", "/dev/"))
    )


def _mount_table() -> list[tuple[str, str, str, str]]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return sorted((r[4], r[5], r[-3], r[-2]) for r in rows if _ours_to_watch(r[4]))


@pytest.fixture(autouse=True)
def host_unchanged():
    before = _mount_table()
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while me.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = me.children(recursive=True)
    for p in left:  # clean up so that one failure does not cascade, then fail
        try:
            p.kill()
            p.wait(2)
        except psutil.Error:
            pass
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    assert _mount_table() == before, "the host's mount table changed"


# --- rootfs, bundles, specs -----------------------------------------------------------------


@pytest.fixture(scope="session")
def rootfs():
    """A busybox rootfs: /bin/<applet> → busybox, /etc/passwd and /etc/group with root and app (1000)."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"busybox is not installed at {BUSYBOX} (apt-get install busybox-static)")
    top = tempfile.mkdtemp(prefix="kagent-rootfs-")
    try:
        os.chmod(top, 0o755)  # user-namespace tests run as an unprivileged host uid
        root = os.path.join(top, "rootfs")
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "data", "scratch"):
            os.makedirs(os.path.join(root, d), mode=0o755)
        os.chmod(os.path.join(root, "tmp"), 0o1777)
        os.chown(os.path.join(root, "home/app"), 1000, 1000)
        shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
        os.chmod(os.path.join(root, "bin", "busybox"), 0o755)
        applets = subprocess.run(
            [BUSYBOX, "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":  # linking it would replace the binary with a self-loop
                os.symlink("busybox", os.path.join(root, "bin", applet))
        with open(os.path.join(root, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
        with open(os.path.join(root, "etc", "group"), "w") as f:
            f.write("root:x:0:\ntty:x:5:\nwheel:x:10:app\napp:x:1000:\n")
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert not os.path.exists(top)


@pytest.fixture
def scratch():
    """A temp dir (pathlib.Path) that is removed after the test, unlike pytest's tmp_path."""
    d = tempfile.mkdtemp(prefix="kagent-scratch-")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)
    assert not os.path.exists(d)


@pytest.fixture
def bundle():
    d = tempfile.mkdtemp(prefix="kagent-bundle-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
    assert not os.path.exists(d)


@pytest.fixture
def spec(rootfs):
    def build(args: list[str], **process: object) -> dict:
        return copy.deepcopy(make_spec(rootfs, args, **process))

    return build


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """Run the test with each syscalls twin."""
    if request.param == "compiled" and syscalls.COMPILED is None:
        pytest.skip(f"compiled syscalls not loaded: {_fast.status()}")
    return request.param


# --- throwaway workers ----------------------------------------------------------------------
