"""StorageManager: reference counts per mount point, shared storages, unwinding a failed add,
unknown drivers — with real bind and tmpfs mounts in a private mount namespace."""

from __future__ import annotations

import asyncio
import os

import pytest
from storage_harness import mounted, run_in_mount_ns, storage

from kagent.errors import InvalidArgument, NotFound
from kagent.storage import SANDBOX_OWNER, StorageManager, handler_names, registry

pytestmark = pytest.mark.root


def manager(tmp: str) -> StorageManager:
    return StorageManager(run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch")


def test_handler_names() -> None:
    names = handler_names()
    assert set(names) == {"virtio-fs", "9p", "blk", "mmioblk", "scsi", "nvdimm", "ephemeral", "local",
                          "overlayfs", "watchable-bind", "bind"}
    assert StorageManager.handler_names() == names


def test_each_driver_is_served_by_its_own_handler() -> None:
    # The registry names each driver's handler without importing it (start-up time).
    for name in handler_names():
        handler = registry.handler_for(name)
        assert name in handler.drivers
        assert registry.handler_for(name) is handler
    with pytest.raises(InvalidArgument, match="no storage handler for driver 'nfs'"):
        registry.handler_for("nfs")


def _src(tmp_path, name="src"):
    src = tmp_path / name
    src.mkdir()
    (src / "f").write_text(name)
    return str(src)


def test_refcount_across_two_owners(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/vol"
        assert await m.add([storage("bind", mp, source=src)], "c1") == [mp]
        assert await m.add([storage("bind", mp + "/", source=src)], "c2") == [mp]
        assert m.refcount(mp) == 2 and len(mounted(mp)) == 1  # reused, not mounted twice
        await m.remove("c1")
        assert m.refcount(mp) == 1 and len(mounted(mp)) == 1
        await m.remove("c1")  # an owner with nothing left: nothing happens
        await m.remove("c2")
        assert m.refcount(mp) == 0 and not mounted(mp) and not os.path.exists(mp)
        assert m.mount_points == []

    run_in_mount_ns(body, roots=[tmp])


def test_shared_storage_kept_until_destroy_all(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        shared, own = f"{tmp}/shared", f"{tmp}/own"
        await m.add([storage("bind", shared, source=src, shared=True),
                     storage("bind", own, source=src)], "c1")
        await m.remove("c1")
        assert mounted(shared) and not mounted(own)
        assert m.mount_points == [shared] and m.refcount(shared) == 0
        await m.add([storage("bind", shared, source=src)], "c2")  # still there: reused
        assert m.refcount(shared) == 1 and len(mounted(shared)) == 1
        assert await m.destroy_all() == []
        assert not mounted(shared) and not os.path.exists(shared) and m.mount_points == []

    run_in_mount_ns(body, roots=[tmp])


def test_unknown_driver_mounts_nothing(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        with pytest.raises(InvalidArgument, match="'image_guest_pull'"):
            await m.add([storage("bind", f"{tmp}/a", source=src),
                         storage("image_guest_pull", f"{tmp}/b")], "c1")
        assert not os.path.exists(f"{tmp}/a") and m.mount_points == []

    run_in_mount_ns(body, roots=[tmp])


@pytest.mark.parametrize("mount_point", ["", "relative/path", "/a/../etc"])
def test_bad_mount_point(tmp_path, mount_point) -> None:
    async def body():
        with pytest.raises(InvalidArgument, match="mount point"):
            await manager(str(tmp_path)).add([storage("local", mount_point)], "c1")

    run_in_mount_ns(body, roots=[str(tmp_path)])


def test_failed_add_unwinds_only_its_own(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        common = f"{tmp}/common"
        await m.add([storage("bind", common, source=src)], "c1")
        with pytest.raises(NotFound):
            await m.add([storage("bind", f"{tmp}/first", source=src),
                         storage("bind", common, source=src),
                         storage("bind", f"{tmp}/broken", source=f"{tmp}/missing")], "c2")
        # c2's own mount is undone, its reference on c1's mount dropped again
        assert not os.path.exists(f"{tmp}/first") and not os.path.exists(f"{tmp}/broken")
        assert m.refcount(common) == 1 and mounted(common)
        assert m.owned_by("c2") == []
        await m.remove("c1")
        assert not mounted(common)

    run_in_mount_ns(body, roots=[tmp])


def test_concurrent_adds_of_one_mount_point(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/vol"
        got = await asyncio.gather(*(m.add([storage("bind", mp, source=src)], f"c{i}") for i in range(5)))
        assert got == [[mp]] * 5
        assert m.refcount(mp) == 5 and len(mounted(mp)) == 1
        await asyncio.gather(*(m.remove(f"c{i}") for i in range(5)))
        assert not mounted(mp)
        # released and added again at once: the new mount is not hit by the old umount
        await m.add([storage("bind", mp, source=src)], "a")
        await asyncio.gather(m.remove("a"), m.add([storage("bind", mp, source=src)], "b"))
        assert len(mounted(mp)) == 1 and m.refcount(mp) == 1
        await m.remove("b")
        assert not mounted(mp)

    run_in_mount_ns(body, roots=[tmp])


def test_waiter_fails_with_the_first_request(tmp_path) -> None:
    tmp = str(tmp_path)

    async def body():
        m = manager(tmp)
        bad = storage("bind", f"{tmp}/vol", source=f"{tmp}/missing")
        results = await asyncio.gather(m.add([bad], "c1"), m.add([bad], "c2"), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
        assert "missing" in str(results[0]) and "another request" in str(results[1])
        assert m.mount_points == [] and m.refcount(f"{tmp}/vol") == 0

    run_in_mount_ns(body, roots=[tmp])


def test_destroy_all_nested_and_sandbox_owned(tmp_path) -> None:
    tmp, src = str(tmp_path), _src(tmp_path)

    async def body():
        m = manager(tmp)
        outer = f"{tmp}/shared"
        await m.add([storage("ephemeral", outer, source="tmpfs", fstype="tmpfs")], SANDBOX_OWNER)
        await m.add([storage("bind", f"{outer}/c1/vol", source=src)], "c1")
        await m.add([storage("local", f"{outer}/c2/emptydir", options=["mode=0777"])], "c2")
        assert await m.destroy_all() == []  # the inner mount goes first: no EBUSY
        assert not mounted(outer) and not mounted(f"{outer}/c1/vol") and not os.path.exists(outer)

    run_in_mount_ns(body, roots=[tmp])
