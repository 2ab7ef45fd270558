"""kagent.guest, the storage side: volume stats, resize, stale virtiofs shares,
termination logs, ephemeral mounts.

Mounts happen only in a forked child's private mount namespace; loop devices are ones
the test creates and detaches.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from types import SimpleNamespace

import pytest
from guest_harness import fake_agent, run_in_child

from kagent import guest
from kagent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
)
from kagent.protocols import oci_pb2
from kagent.runtime import syscalls

MiB = 1 << 20

# --- GetVolumeStats ----------------------------------------------------------------------------


def test_volume_stats_match_statvfs(tmp_path):
    space, inodes = guest.volume_stats(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert space.total == st.f_blocks * st.f_frsize
    assert space.available == st.f_bavail * st.f_frsize
    assert space.used == (st.f_blocks - st.f_bfree) * st.f_frsize
    assert inodes.total == st.f_files and inodes.used == st.f_files - st.f_ffree


def test_volume_stats_errors(tmp_path):
    with pytest.raises(NotFound):
        guest.volume_stats(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument):
        guest.volume_stats("")


@pytest.mark.root
def test_volume_stats_of_a_sized_tmpfs(tmp_path):
    def child():
        syscalls.mount("tmpfs", str(tmp_path), "tmpfs", 0, "size=4m,nr_inodes=1000")
        with open(tmp_path / "f", "wb") as f:
            f.write(b"x" * MiB)
        space, inodes = guest.volume_stats(str(tmp_path))
        return [space.total, space.used, inodes.total, inodes.used]

    total, used, itotal, iused = run_in_child(child, mount_ns=True)
    assert total == 4 * MiB and used >= MiB
    assert itotal == 1000 and iused >= 2  # the root directory and f


# --- ResizeVolume ------------------------------------------------------------------------------


def _mountinfo(path, mount_point, fstype, source):
    path.write_text(f"27 1 254:0 / / rw,relatime - ext4 /dev/root rw\n"
                    f"99 27 7:9 / {mount_point} rw,relatime - {fstype} {source} rw\n")
    return str(path)


def test_resize_missing_path(tmp_path):
    with pytest.raises(NotFound):
        guest.resize_volume(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument):
        guest.resize_volume("")


def test_resize_refuses_what_is_not_on_a_block_device(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    info = _mountinfo(tmp_path / "mountinfo", vol, "ext4", "/dev/null")
    with pytest.raises(FailedPrecondition, match="not a block device"):
        guest.resize_volume(str(vol), mountinfo_path=info)


@pytest.fixture
def block_node(tmp_path):
    """A block device node (loop0's numbers) that the refusals below never open."""
    node = tmp_path / "blk"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    return str(node)


@pytest.mark.root
def test_resize_unimplemented_without_the_tool(tmp_path, block_node):
    vol = tmp_path / "vol"
    vol.mkdir()
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    info = _mountinfo(tmp_path / "mountinfo", vol, "ext4", block_node)
    with pytest.raises(Unimplemented, match="resize2fs is not installed"):
        guest.resize_volume(str(vol / "."), mountinfo_path=info, search_path=str(empty_bin))
    info = _mountinfo(tmp_path / "mountinfo", vol, "xfs", block_node)
    with pytest.raises(Unimplemented, match="xfs_growfs is not installed"):
        guest.resize_volume(str(vol), mountinfo_path=info, search_path=str(empty_bin))


@pytest.mark.root
def test_resize_unimplemented_for_other_filesystems(tmp_path, block_node):
    vol = tmp_path / "vol"
    vol.mkdir()
    info = _mountinfo(tmp_path / "mountinfo", vol, "vfat", block_node)
    with pytest.raises(Unimplemented, match="vfat filesystem is not supported"):
        guest.resize_volume(str(vol), mountinfo_path=info)


def _tools(*names):
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


CAP_SYS_RESOURCE = 24


def _have_cap(cap: int) -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << cap))


@pytest.mark.root
def test_resize_grows_a_real_ext4_on_a_loop_device(tmp_path):
    """mkfs.ext4 on a 16 MiB file, losetup, mount in a private namespace, grow the file
    to 32 MiB, tell the loop device, then ResizeVolume runs the real resize2fs.

    ext4's online resize needs CAP_SYS_RESOURCE, which root lacks on these machines
    (machine-facts): there the test checks that the tool's refusal comes back whole;
    with the capability, that the filesystem fills the device."""
    _tools("losetup", "mkfs.ext4", "resize2fs")
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        def child():
            syscalls.mount(loop, str(mnt), "ext4", 0, None)
            try:
                before = os.statvfs(mnt)
                with open(img, "r+b") as f:
                    f.truncate(32 * MiB)
                subprocess.run(["losetup", "--set-capacity", loop], check=True, capture_output=True)
                try:
                    tool = guest.resize_volume(str(mnt))
                except AgentError as exc:
                    tool = "error: " + exc.message
                after = os.statvfs(mnt)
            finally:
                syscalls.umount2(str(mnt), syscalls.MNT_DETACH)
            return [tool, before.f_blocks * before.f_frsize, after.f_blocks * after.f_frsize]

        tool, before, after = run_in_child(child, mount_ns=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
    assert before < 17 * MiB
    if _have_cap(CAP_SYS_RESOURCE):
        assert tool == "resize2fs" and after > 28 * MiB
    else:
        assert tool.startswith(f"error: ResizeVolume: resize2fs {loop} failed")
        assert "Permission denied" in tool and after == before


# --- RemoveStaleVirtiofsShareMounts ------------------------------------------------------------


def test_stale_share_mounts_from_a_mountinfo(tmp_path):
    base = tmp_path / "shared/containers"
    (base / "live").mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(
        f"27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        f"50 27 0:40 / {base}/live rw - virtiofs kataShared rw\n"
        f"51 27 0:41 / {base}/gone rw - virtiofs kataShared rw\n"
        f"52 27 0:41 / {base}/gone rw - virtiofs kataShared rw\n"
        f"53 27 0:42 / {tmp_path}/elsewhere rw - virtiofs kataShared rw\n"
        f"54 27 0:43 / {base}x/sibling rw - virtiofs kataShared rw\n"
    )
    seen = guest.stat_shared_mounts(str(base) + "/", str(info))
    assert seen == {f"{base}/live": True, f"{base}/gone": False}


def test_stale_share_mounts_missing_mountinfo(tmp_path):
    with pytest.raises(NotFound):
        guest.stat_shared_mounts(str(tmp_path), str(tmp_path / "mountinfo"))


@pytest.mark.root
def test_stale_share_mounts_real_mount(tmp_path):
    base = tmp_path / "containers"
    (base / "ctr1").mkdir(parents=True)

    def child():
        syscalls.mount("tmpfs", str(base / "ctr1"), "tmpfs", 0, "size=1m")
        return guest.stat_shared_mounts(str(base))

    assert run_in_child(child, mount_ns=True) == {f"{base}/ctr1": True}


# --- GetDiagnosticData -------------------------------------------------------------------------


def _agent_with(spec):
    return fake_agent(sandbox=SimpleNamespace(containers={"c1": SimpleNamespace(spec=spec)}))


def _spec(source, dest="/dev/termination-log"):
    return {"annotations": {guest.TERMINATION_ANNOTATION: dest},
            "mounts": [{"destination": "/proc", "source": "proc"},
                       {"destination": dest, "source": str(source)}]}


def test_termination_log_read_and_capped(tmp_path):
    log = tmp_path / "termination-log"
    log.write_bytes(b"A" * 5000)
    assert guest.diagnostic_data(_agent_with(_spec(log)), "termination_log", "c1") == "A" * 4096


def test_termination_log_from_a_proto_spec(tmp_path):
    log = tmp_path / "termination-log"
    log.write_bytes(b"bye \xff")
    spec = oci_pb2.Spec(Annotations={guest.TERMINATION_ANNOTATION: "/dev/termination-log"},
                        Mounts=[oci_pb2.Mount(destination="/dev/termination-log", source=str(log))])
    assert guest.diagnostic_data(_agent_with(spec), "termination_log", "c1") == "bye \ufffd"


def test_termination_log_not_written_yet_is_empty(tmp_path):
    assert guest.diagnostic_data(_agent_with(_spec(tmp_path / "none")), "termination_log", "c1") == ""


def test_termination_log_refuses_links_and_fifos(tmp_path):
    (tmp_path / "secret").write_text("s3cret")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "secret")
    with pytest.raises(PermissionDenied, match="symlink"):
        guest.diagnostic_data(_agent_with(_spec(link)), "termination_log", "c1")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block a plain open/read
    with pytest.raises(InvalidArgument, match="not a regular file"):
        guest.diagnostic_data(_agent_with(_spec(fifo)), "termination_log", "c1")


def test_diagnostic_data_errors(tmp_path):
    agent = _agent_with(_spec(tmp_path / "log"))
    with pytest.raises(InvalidArgument, match="unsupported log_type"):
        guest.diagnostic_data(agent, "kernel_log", "c1")
    with pytest.raises(NotFound, match="no container"):
        guest.diagnostic_data(agent, "termination_log", "c2")
    with pytest.raises(NotFound, match="no sandbox"):
        guest.diagnostic_data(fake_agent(), "termination_log", "c1")
    with pytest.raises(NotFound, match="no OCI spec"):
        guest.diagnostic_data(_agent_with(None), "termination_log", "c1")
    with pytest.raises(NotFound, match="annotation"):
        guest.diagnostic_data(_agent_with({"mounts": []}), "termination_log", "c1")
    spec = _spec(tmp_path / "log")
    spec["mounts"] = spec["mounts"][:1]
    with pytest.raises(NotFound, match="no mount at its termination message path"):
        guest.diagnostic_data(_agent_with(spec), "termination_log", "c1")


# --- UpdateEphemeralMounts ---------------------------------------------------------------------


def _eph(mount_point, *options, driver="ephemeral"):
    return guest.EphemeralMount(driver, "tmpfs", "tmpfs", tuple(options), str(mount_point))


def test_ephemeral_other_drivers_refused_before_anything_is_done(tmp_path):
    first = tmp_path / "first"
    with pytest.raises(InvalidArgument, match="driver 'blk'"):
        guest.update_ephemeral_mounts([_eph(first), _eph(tmp_path / "b", driver="blk")])
    assert not first.exists()
    with pytest.raises(InvalidArgument, match="not absolute"):
        guest.update_ephemeral_mounts([_eph("relative/dir")])


def test_ephemeral_without_options_only_creates_the_mount_point(tmp_path):
    target = tmp_path / "a/b"
    guest.update_ephemeral_mounts([_eph(target)])
    assert target.is_dir()


@pytest.mark.root
def test_ephemeral_mount_then_resize(tmp_path):
    target = tmp_path / "shm"

    def child():
        guest.update_ephemeral_mounts([_eph(target, "size=1m", "nodev", "fsgid=1000")])
        first = os.statvfs(target)
        guest.update_ephemeral_mounts([_eph(target, "remount", "size=2m", "fsgid=1000")])
        second = os.statvfs(target)
        with open("/proc/self/mountinfo") as f:
            line = next(row for row in f if row.split()[4] == str(target))
        return [first.f_blocks * first.f_frsize, second.f_blocks * second.f_frsize,
                bool(first.f_flag & os.ST_NODEV), line.split(" - ")[1].split()[0]]

    first, second, nodev, fstype = run_in_child(child, mount_ns=True)
    assert (first, second, nodev, fstype) == (MiB, 2 * MiB, True, "tmpfs")
