"""Fixtures for the storage tests: a real ext4 image on a loop device (detached at the end)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


@pytest.fixture
def ext4_loop(tmp_path):
    """``/dev/loopN`` holding a fresh ext4 filesystem; the device is detached afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kagent-test", str(image)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                             text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device: {exc.stderr.strip()}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
