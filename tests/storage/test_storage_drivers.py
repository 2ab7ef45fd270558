"""Each storage driver with real mounts, in a private mount namespace (storage_harness).

Disks (blk and friends) are in test_storage_block.py, watchable-bind in
test_storage_watchable.py, reference counting in test_storage_manager.py.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from storage_harness import fstype_at, mounted, run_in_mount_ns, storage

from kagent.errors import FailedPrecondition, InvalidArgument
from kagent.storage import SANDBOX_OWNER, StorageManager
from kagent.storage.common import split_options
from kagent.storage.ephemeral import hugepage_request
from kagent.storage.ownership import ALWAYS, ON_ROOT_MISMATCH
from kagent.storage.sharedfs import nine_p_options

pytestmark = pytest.mark.root


def manager(tmp: str, **kw) -> StorageManager:
    return StorageManager(run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch", **kw)


# --- option parsing (no mounts) ---------------------------------------------------------------


@pytest.mark.parametrize(("given", "want"), [
    (["ro", "nodev"], ["ro", "nodev"]),
    (["trans=virtio,version=9p2000.L,cache=mmap", "nodev"],
     ["trans=virtio", "version=9p2000.L", "cache=mmap", "nodev"]),
    (['context="system_u:object_r:s0:c1,c2",ro'], ['context="system_u:object_r:s0:c1,c2"', "ro"]),
    ([" size=10m , ", ""], ["size=10m"]),
])
def test_split_options(given, want) -> None:
    assert split_options(given) == want


def test_nine_p_goes_over_virtio_unless_told() -> None:
    assert nine_p_options(("version=9p2000.L", "nodev")) == ["version=9p2000.L", "nodev", "trans=virtio"]
    assert nine_p_options(("trans=fd", "rfdno=3")) == ["trans=fd", "rfdno=3"]


@pytest.mark.parametrize(("options", "want"), [
    (("pagesize=2097152", "size=524288000"), (2097152, 524288000)),
    (("foo=bar", "size=107374182", "pagesize=2048"), (2048, 107374182)),
])
def test_hugepage_request(options, want) -> None:
    assert hugepage_request(options) == want


@pytest.mark.parametrize("options", [
    ("size=107374182",), ("pagesize=2048",), ("size=abc", "pagesize=2048"),
    ("size=", "pagesize=2048"), ("size=1", "pagesize=12"),
])
def test_hugepage_request_refuses(options) -> None:
    with pytest.raises(InvalidArgument):
        hugepage_request(options)


# --- ephemeral --------------------------------------------------------------------------------


def test_ephemeral_tmpfs_with_fsgid(tmp_path) -> None:
    tmp = str(tmp_path)
    mp = f"{tmp}/sandbox/ephemeral/cache"

    async def body():
        m = manager(tmp)
        got = await m.add([storage("ephemeral", mp, source="tmpfs", fstype="tmpfs",
                                   options=["size=1m", "mode=0750", "nodev", "fsgid=2345"])], "c1")
        assert got == [mp]
        assert fstype_at(mp) == "tmpfs"
        st = os.stat(mp)
        assert st.st_gid == 2345 and st.st_mode & stat.S_ISGID
        assert stat.S_IMODE(st.st_mode) & 0o777 == 0o750  # the other options reached the kernel
        vfs = os.statvfs(mp)
        assert vfs.f_blocks * vfs.f_frsize == 1 << 20
        assert "nodev" in mounted(mp)[-1].options and "fsgid" not in mounted(mp)[-1].super_options
        # emptyDir data outlives the container: only the sandbox's end unmounts it
        await m.remove("c1")
        assert fstype_at(mp) == "tmpfs"
        assert await m.destroy_all() == []
        assert fstype_at(mp) is None and not os.path.exists(f"{tmp}/sandbox")

    run_in_mount_ns(body, roots=[tmp])


def test_ephemeral_bad_fsgid_mounts_nothing(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        m = manager(tmp)
        with pytest.raises(InvalidArgument, match="fsgid"):
            await m.add([storage("ephemeral", f"{tmp}/e", fstype="tmpfs", options=["fsgid=x"])], "c1")
        assert not os.path.exists(f"{tmp}/e") and m.mount_points == []

    run_in_mount_ns(body, roots=[tmp])


def test_ephemeral_hugetlbfs_allocates_pages(tmp_path) -> None:
    tmp = str(tmp_path)
    sysfs = f"{tmp}/sys"  # a fake sysfs: the host's hugepage pool must not change
    nr = f"{sysfs}/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    os.makedirs(os.path.dirname(nr))
    with open(nr, "w") as f:
        f.write("0\n")
    mp = f"{tmp}/hugepages/hugepages-2Mi"

    async def body():
        m = manager(tmp, sysfs_root=sysfs)
        await m.add([storage("ephemeral", mp, source="nodev", fstype="hugetlbfs",
                             options=["pagesize=2097152", "size=4194304"])], "c1")
        with open(nr) as f:
            assert f.read() == "2"
        assert fstype_at(mp) == "hugetlbfs"
        # a page size the kernel does not have
        with pytest.raises(FailedPrecondition, match="1048576 kB"):
            await m.add([storage("ephemeral", f"{tmp}/huge1g", fstype="hugetlbfs",
                                 options=["pagesize=1073741824,size=1073741824"])], "c1")
        assert not os.path.exists(f"{tmp}/huge1g")
        await m.destroy_all()
        assert fstype_at(mp) is None

    run_in_mount_ns(body, roots=[tmp])


# --- local ------------------------------------------------------------------------------------


def test_local_mode_and_fsgid(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        m = manager(tmp)
        a, b = f"{tmp}/local/a/data", f"{tmp}/local/b"
        await m.add([storage("local", a, options=["mode=0770", "fsgid=3456"]),
                     storage("local", b, options=["fsgid=3456"])], "c1")
        st = os.stat(a)
        assert stat.S_IMODE(st.st_mode) == 0o2770 and st.st_gid == 3456
        st = os.stat(b)  # upstream's rule: setgid only comes with mode=
        assert st.st_gid == 3456 and not st.st_mode & stat.S_ISGID
        assert fstype_at(a) is None  # nothing is mounted
        with open(f"{a}/kept", "w") as f:
            f.write("data")
        await m.remove("c1")
        assert os.path.exists(f"{a}/kept")  # emptyDir data survives the container
        await m.destroy_all()
        assert os.path.exists(f"{a}/kept") and not os.path.exists(b)  # rmdir only when empty
        with pytest.raises(InvalidArgument, match="mode"):
            await m.add([storage("local", f"{tmp}/bad", options=["mode=0999"])], "c2")

    run_in_mount_ns(body, roots=[tmp])


# --- bind -------------------------------------------------------------------------------------


def test_bind_read_only(tmp_path) -> None:
    tmp = str(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("hello")

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/mnt/ro"
        await m.add([storage("bind", mp, source=str(src), options=["ro"])], "c1")
        with open(f"{mp}/f") as f:
            assert f.read() == "hello"
        with pytest.raises(OSError) as info:
            open(f"{mp}/new", "w")
        assert info.value.errno == errno.EROFS
        assert "ro" in mounted(mp)[-1].options.split(",")
        await m.remove("c1")
        assert not mounted(mp) and not os.path.exists(f"{tmp}/mnt")
        assert (src / "f").read_text() == "hello"

    run_in_mount_ns(body, roots=[tmp])


def test_bind_of_a_file(tmp_path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "hosts").write_text("127.0.0.1 pod\n")

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/etc/hosts"
        await m.add([storage("bind", mp, source=f"{tmp}/hosts", fstype="bind")], "c1")
        assert os.path.isfile(mp) and mounted(mp)
        with open(mp) as f:
            assert f.read() == "127.0.0.1 pod\n"
        await m.remove("c1")
        assert not os.path.exists(f"{tmp}/etc")

    run_in_mount_ns(body, roots=[tmp])


def test_bind_missing_source(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        m = manager(tmp)
        with pytest.raises(Exception, match="source") as info:
            await m.add([storage("bind", f"{tmp}/m", source=f"{tmp}/nothing")], "c1")
        assert info.value.code.name == "NOT_FOUND"
        assert not os.path.exists(f"{tmp}/m")

    run_in_mount_ns(body, roots=[tmp])


# --- overlayfs --------------------------------------------------------------------------------


def test_overlay_rw_gets_upper_and_work(tmp_path) -> None:
    tmp = str(tmp_path)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "base").write_text("lower")

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/run/c1/rootfs"
        await m.add([storage("overlayfs", mp, source="overlay", fstype="overlay",
                             options=[f"lowerdir={lower}", "io.katacontainers.fs-opt.overlay-rw"])], "c1")
        assert fstype_at(mp) == "overlay"
        with open(f"{mp}/new", "w") as f:
            f.write("upper")
        assert os.path.exists(f"{tmp}/run/c1/upper/new") and os.path.isdir(f"{tmp}/run/c1/work")
        assert not (lower / "new").exists()
        # the kata marker is not kernel mount data
        assert "katacontainers" not in mounted(mp)[-1].super_options
        with pytest.raises(InvalidArgument, match="needs a container"):
            await m.add([storage("overlayfs", f"{tmp}/sb", fstype="overlay",
                                 options=[f"lowerdir={lower}", "io.katacontainers.fs-opt.overlay-rw"])],
                        SANDBOX_OWNER)
        await m.remove("c1")
        assert fstype_at(mp) is None and not os.path.exists(mp)
        assert os.path.exists(f"{tmp}/run/c1/upper/new")  # the writable layer keeps its data

    run_in_mount_ns(body, roots=[tmp])


def test_overlay_create_directory(tmp_path) -> None:
    tmp = str(tmp_path)
    lower = tmp_path / "lower"
    lower.mkdir()
    key = "io.katacontainers.volume.overlayfs.create_directory"

    async def body():
        m = manager(tmp)
        upper, work, mp = f"{tmp}/w/upper", f"{tmp}/w/work", f"{tmp}/ovl"
        await m.add([storage("overlayfs", mp, source="overlay", fstype="overlay",
                             driver_options=[f"{key}={upper}", f"{key}={work}"],
                             options=[f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}",
                                      "index=off"])], "c1")
        assert fstype_at(mp) == "overlay" and os.path.isdir(upper)
        await m.remove("c1")
        assert not os.path.exists(mp)
        assert not os.path.exists(f"{tmp}/w/upper")  # created here and left empty: removed
        with pytest.raises(InvalidArgument):
            await m.add([storage("overlayfs", mp, fstype="overlay", driver_options=[f"{key}=relative"],
                                 options=[f"lowerdir={lower}"])], "c1")

    run_in_mount_ns(body, roots=[tmp])


# --- shared filesystems -----------------------------------------------------------------------


def test_virtiofs_premounted_share_is_left_alone(tmp_path) -> None:
    tmp = str(tmp_path)
    shared = f"{tmp}/shared/containers"

    async def body():
        from kagent.runtime import syscalls

        os.makedirs(shared)
        syscalls.mount("kataShared", shared, "tmpfs", 0, None)  # as a guest image would
        m = manager(tmp)
        got = await m.add([storage("virtio-fs", shared + "/", source="kataShared", fstype="virtiofs")],
                          SANDBOX_OWNER)
        assert got == [shared]  # normalised: the host sends a trailing slash
        assert len(mounted(shared)) == 1
        await m.destroy_all()
        assert len(mounted(shared)) == 1  # not ours to umount

    run_in_mount_ns(body, roots=[tmp])


def test_virtiofs_and_9p_errors_name_the_mount(tmp_path) -> None:
    # No virtio device exists here: the kernel answers ENODEV, and nothing is left behind.
    tmp = str(tmp_path)

    async def body():
        m = manager(tmp)
        for driver, fstype in (("virtio-fs", "virtiofs"), ("9p", "9p")):
            mp = f"{tmp}/{driver}/mnt"
            with pytest.raises(FailedPrecondition, match=f"{driver} storage .* at {mp}"):
                await m.add([storage(driver, mp, source="someTag", fstype=fstype)], "c1")
            assert not os.path.exists(f"{tmp}/{driver}")

    run_in_mount_ns(body, roots=[tmp])


# --- fs_group ---------------------------------------------------------------------------------


def _volume(root) -> None:
    (root / "dir").mkdir(mode=0o700)
    (root / "dir" / "file").write_text("x")
    os.chmod(root / "dir" / "file", 0o600)
    os.symlink("dir/file", root / "link")
    os.chmod(root, 0o700)


def test_fs_group_always(tmp_path) -> None:
    tmp = str(tmp_path)
    src = tmp_path / "vol"
    src.mkdir()
    _volume(src)

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/mnt"
        await m.add([storage("bind", mp, source=str(src), fs_group=(4567, ALWAYS))], "c1")
        for path, mode in ((mp, 0o2770), (f"{mp}/dir", 0o2770), (f"{mp}/dir/file", 0o660)):
            st = os.stat(path)
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (4567, mode), path
        assert os.lstat(f"{mp}/link").st_gid == 0  # symlinks are not followed nor changed
        await m.destroy_all()

    run_in_mount_ns(body, roots=[tmp])


def test_fs_group_on_root_mismatch(tmp_path) -> None:
    tmp = str(tmp_path)
    done, fresh = tmp_path / "done", tmp_path / "fresh"
    for src in (done, fresh):
        src.mkdir()
        _volume(src)
    # "done": the root already has the group and the bits, so the walk is skipped
    os.chown(done, -1, 4567)
    os.chmod(done, 0o2770)

    async def body():
        m = manager(tmp)
        await m.add([storage("bind", f"{tmp}/m1", source=str(done), fs_group=(4567, ON_ROOT_MISMATCH)),
                     storage("bind", f"{tmp}/m2", source=str(fresh), fs_group=(4567, ON_ROOT_MISMATCH))],
                    "c1")
        st = os.stat(f"{tmp}/m1/dir/file")
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # untouched
        st = os.stat(f"{tmp}/m2/dir/file")
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (4567, 0o660)  # the root differed: walked
        await m.destroy_all()

    run_in_mount_ns(body, roots=[tmp])
