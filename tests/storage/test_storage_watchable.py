"""watchable-bind: polled and mirrored into a tmpfs, and bound instead past the limits.

The poll interval is 0.1 s here (2 s in the agent) to keep the tests fast.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from storage_harness import fstype_at, mounted, run_in_mount_ns, storage

from kagent.storage import StorageManager
from kagent.storage.watchable import MAX_BYTES, MAX_ENTRIES, WatchedDevice

pytestmark = pytest.mark.root

INTERVAL = 0.1


def manager(tmp: str) -> StorageManager:
    return StorageManager(run_dir=f"{tmp}/run", watch_root=f"{tmp}/watch", watch_interval=INTERVAL)


async def eventually(check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {check.__doc__ or check}")
        await asyncio.sleep(0.05)


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def test_mirrors_changes(tmp_path) -> None:
    tmp = str(tmp_path)
    src = tmp_path / "configmap"
    (src / "sub").mkdir(parents=True)
    (src / "key").write_text("v1")
    (src / "sub" / "other").write_text("o")
    os.symlink("key", src / "alias")
    os.chmod(src / "key", 0o640)

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/watch/c1-configmap"
        await m.add([storage("watchable-bind", mp, source=str(src))], "c1")
        assert fstype_at(f"{tmp}/watch") == "tmpfs"  # the mirrors live on the agent's tmpfs
        assert fstype_at(mp) is None  # a copy, not a mount
        assert read(f"{mp}/key") == "v1" and read(f"{mp}/sub/other") == "o"
        assert os.readlink(f"{mp}/alias") == "key" and os.stat(f"{mp}/key").st_mode & 0o777 == 0o640
        # a change, a new file and a removal reach the mirror at the next polls
        time.sleep(0.01)  # a distinct mtime
        (src / "key").write_text("v2")
        (src / "new").write_text("n")
        (src / "sub" / "other").unlink()
        await eventually(lambda: read(f"{mp}/key") == "v2" and read(f"{mp}/new") == "n"
                         and not os.path.exists(f"{mp}/sub/other"))
        dev = m.device(mp)
        assert isinstance(dev, WatchedDevice) and dev.mirror.watching and not dev.task.done()
        await m.remove("c1")
        assert dev.task is None and not os.path.exists(mp)
        assert (src / "key").read_text() == "v2"  # the source is never touched
        assert await m.destroy_all() == []
        assert fstype_at(f"{tmp}/watch") is None and not os.path.exists(f"{tmp}/watch")

    run_in_mount_ns(body, roots=[tmp])


def test_single_file(tmp_path) -> None:
    tmp = str(tmp_path)
    (tmp_path / "token").write_text("t1")

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/watch/c1/token"
        await m.add([storage("watchable-bind", mp, source=f"{tmp}/token")], "c1")
        assert read(mp) == "t1"
        time.sleep(0.01)
        (tmp_path / "token").write_text("t2")
        await eventually(lambda: read(mp) == "t2")
        await m.remove("c1")
        assert not os.path.exists(mp)
        await m.destroy_all()

    run_in_mount_ns(body, roots=[tmp])


def test_too_many_entries_becomes_a_bind(tmp_path) -> None:
    tmp = str(tmp_path)
    many, fits = tmp_path / "many", tmp_path / "fits"
    many.mkdir()
    fits.mkdir()
    for i in range(MAX_ENTRIES + 4):
        (many / f"{i}.txt").write_text("x")
    for i in range(MAX_ENTRIES - 1):  # 15 files + the directory: exactly the limit
        (fits / f"{i}.txt").write_text("x")

    async def body():
        m = manager(tmp)
        mp_many, mp_fits = f"{tmp}/watch/many", f"{tmp}/watch/fits"
        await m.add([storage("watchable-bind", mp_many, source=str(many)),
                     storage("watchable-bind", mp_fits, source=str(fits))], "c1")
        d_many, d_fits = m.device(mp_many), m.device(mp_fits)
        assert d_many.mirror.bound and not d_many.mirror.watching and d_many.task is None
        assert mounted(mp_many)  # a bind: changes show at once
        (many / "late").write_text("now")
        assert read(f"{mp_many}/late") == "now"
        assert d_fits.mirror.watching and not mounted(mp_fits)
        # one more file pushes the watched one past the limit: bound at the next poll
        (fits / "one-more").write_text("x")
        await eventually(lambda: d_fits.mirror.bound)
        assert mounted(mp_fits) and read(f"{mp_fits}/one-more") == "x"
        await eventually(lambda: d_fits.task.done())
        await m.remove("c1")
        assert not mounted(mp_many) and not mounted(mp_fits)
        assert not os.path.exists(mp_many) and len(os.listdir(many)) == MAX_ENTRIES + 5  # source intact
        await m.destroy_all()

    run_in_mount_ns(body, roots=[tmp])


def test_too_large_becomes_a_bind(tmp_path) -> None:
    tmp = str(tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "blob", "wb") as f:
        f.truncate(MAX_BYTES + 1)

    async def body():
        m = manager(tmp)
        mp = f"{tmp}/watch/big"
        await m.add([storage("watchable-bind", mp, source=str(big))], "c1")
        assert m.device(mp).mirror.bound and mounted(mp)
        await m.destroy_all()
        assert not mounted(mp) and (big / "blob").exists()

    run_in_mount_ns(body, roots=[tmp])
