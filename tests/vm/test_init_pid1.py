"""kagent.init outside a VM: PID 1 of private namespaces (init_probe.py), and its pure parts.

Runs in the ordinary suite (no QEMU).  The namespace tests need root.
"""

from __future__ import annotations

import errno
import json
import lzma
import os
import signal
import subprocess
import sys

import pytest

from kagent import init
from vm import cpio
from vm.kernel import extract_vmlinux

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init_probe.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(PROBE)))


def probe(tmp_path, end: str) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, PROBE, str(tmp_path), end], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.strip().splitlines()[-1])["exitcode"]
    with open(tmp_path / "result.json") as f:
        return status, json.load(f), done.stderr


@pytest.mark.root
def test_init_as_pid1_mounts_reaps_and_powers_off(tmp_path):
    status, r, log = probe(tmp_path, "exit0")
    assert "error" not in r, r
    # the supervisor is PID 1's child, in a session of its own, and knows it is in init mode
    assert r["ppid"] == 1 and r["pid"] != 1 and r["sid_is_self"] and r["init_mode"]
    assert r["pid1_comm"] == "kagent-init"
    root = str(tmp_path / "root")
    want = {"proc": "proc", "sys": "sysfs", "dev": "tmpfs", "dev/shm": "tmpfs", "dev/pts": "devpts", "run": "tmpfs"}
    for rel, fstype in want.items():
        assert r["mounts"].get(os.path.join(root, rel)) == fstype, (rel, r["mounts"])
    assert r["second_prepare"] == {"mounted": [], "skipped": len(want)}  # what is mounted is skipped
    assert r["ptmx"] == "pts/ptmx"
    assert r["hostname"] == "probe-guest"
    assert r["lo_up"] is True
    assert r["PATH"] == init.PATH
    # every orphan reaped by PID 1; no command's exit status stolen from subprocess.run
    assert r["orphans_left"] == []
    assert (r["command_codes"], r["commands"]) == ([7], 45)
    assert '"msg":"orphan reaped"' in log
    # the supervisor exited 0: PID 1 powered off, which ends a PID namespace with SIGINT
    assert status == -signal.SIGINT, log
    assert '"msg":"agent exited: powering off"' in log


@pytest.mark.root
@pytest.mark.parametrize("end, how", [("exit3", "exit 3"), ("sigkill", "signal 9")])
def test_init_exits_on_purpose_when_the_agent_dies(tmp_path, end, how):
    status, r, log = probe(tmp_path, end)
    assert "error" not in r, r
    assert status == 1, log  # in a VM: "Attempted to kill init", a panic that pvpanic reports
    assert f'"reason":"agent died ({how})"' in log


@pytest.mark.skipif(os.getpid() == 1, reason="this test process is PID 1: power_off() would act")
def test_power_off_refuses_unless_pid1():
    with pytest.raises(RuntimeError, match="PID 1"):
        init.power_off()
    with pytest.raises(RuntimeError, match="PID 1"):
        init.main()


# --- kernel modules ---------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def test_module_plan_loads_each_chain_deepest_first_once():
    deps = init.parse_modules_dep(MODULES_DEP)
    order, unknown = init.module_plan(["virtio_pci", "virtio_console", "virtio-rng", "nosuch"], deps)
    assert [os.path.basename(p) for p in order] == [
        "virtio_ring.ko", "virtio.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
        "virtio_pci.ko", "virtio_console.ko", "virtio-rng.ko"]
    assert unknown == ["nosuch"]


def test_load_modules_reports_problems_and_never_raises(tmp_path):
    release = "9.9.9-test"
    moddir = tmp_path / "lib/modules" / release
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    (moddir / "modules.dep").write_text("kernel/drivers/virtio/virtio.ko:\n")
    (moddir / "kernel/drivers/virtio/virtio.ko").write_bytes(b"not a module")
    (tmp_path / "etc/modules-load.d").mkdir(parents=True)
    (tmp_path / "etc/modules-load.d/kagent.conf").write_text("# comment\nvirtio  # trailing\nmissing\n")
    assert init.wanted_modules(str(tmp_path)) == ["virtio", "missing"]
    report = init.load_modules(root=str(tmp_path), release=release)
    assert report.modules == []
    assert any("missing" in p for p in report.problems)
    # this machine's kernel has no module support (ENOSYS); a VM kernel would refuse the
    # file (ENOEXEC), or EPERM without CAP_SYS_MODULE: reported either way
    assert any("finit_module" in p and "virtio.ko" in p for p in report.problems), report.problems
    assert init.load_modules(root=str(tmp_path / "nothing"), release=release).problems == []


def test_load_modules_without_modules_dep(tmp_path):
    report = init.load_modules(["virtio"], root=str(tmp_path), release="0")
    assert len(report.problems) == 1 and "modules.dep" in report.problems[0]


# --- image building blocks -------------------------------------------------------------------


def _read_cpio(data: bytes) -> list[dict]:
    entries, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos: pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append({"name": name, "ino": f[0], "mode": f[1], "uid": f[2], "nlink": f[4], "mtime": f[5],
                        "rdev": (f[9], f[10]), "data": body})


def test_cpio_tree_is_deterministic_with_links_devices_and_hardlinks(tmp_path):
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF busybox")
    os.link(root / "bin/busybox", root / "busybox-again")
    os.symlink("busybox", root / "bin/sh")
    (root / "init").write_text("#!/bin/sh\n")
    os.chmod(root / "init", 0o755)
    first, second = tmp_path / "a.cpio", tmp_path / "b.cpio"
    extra = [cpio.Node("dev/console", 0o020600, rdev=(5, 1))]
    for out in (first, second):
        with open(out, "wb") as f:
            size = cpio.write_tree(str(root), f, extra)
        assert size == out.stat().st_size and size % 4 == 0
    assert first.read_bytes() == second.read_bytes()
    entries = {e["name"]: e for e in _read_cpio(first.read_bytes())}
    names = list(entries)
    assert all(os.path.dirname(n) in ("", *names[:i]) for i, n in enumerate(names))  # parents first
    assert entries["bin/sh"]["mode"] == 0o120777 and entries["bin/sh"]["data"] == b"busybox"
    assert entries["init"]["mode"] == 0o100755 and entries["init"]["data"] == b"#!/bin/sh\n"
    assert entries["dev/console"]["rdev"] == (5, 1)
    assert all(e["uid"] == 0 and e["mtime"] == 0 for e in entries.values())
    a, b = entries["bin/busybox"], entries["busybox-again"]
    assert a["ino"] == b["ino"] and a["nlink"] == b["nlink"] == 2
    assert sorted([a["data"], b["data"]]) == [b"", b"\x7fELF busybox"]  # the data is stored once


def test_cpio_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with open(os.devnull, "wb") as f, pytest.raises(ValueError, match="cannot archive"):
        cpio.write_tree(str(tmp_path), f)


def test_extract_vmlinux_finds_the_xz_elf_in_a_bzimage():
    elf = b"\x7fELF" + os.urandom(4096)
    blob = b"MZ setup code \xfd7zXZ\x00 false start " + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\0" * 64
    assert extract_vmlinux(blob) == elf
    with pytest.raises(RuntimeError, match="no XZ"):
        extract_vmlinux(b"MZ" + lzma.compress(b"not an elf", format=lzma.FORMAT_XZ))


def test_finit_module_error_names_the_file(tmp_path):
    path = tmp_path / "x.ko"
    path.write_bytes(b"junk")
    with pytest.raises(OSError) as err:
        init._finit_module(str(path))
    assert err.value.errno in (errno.ENOSYS, errno.ENOEXEC, errno.EPERM, errno.EINVAL)
    assert "x.ko" in str(err.value)
