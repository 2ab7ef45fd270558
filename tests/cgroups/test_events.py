"""What the supervisor's handlers will run on the event loop: the OOM queue
(GetOOMEvent) and CPU/memory onlining (OnlineCPUMem), on fake files.

The OOM watches are real inotify watches on plain files standing for
memory.events (this machine's cgroup2 has no memory controller); the real v1
eventfd path is covered in test_v1.py.  The fake sysfs gets a tiny stand-in
kernel that recomputes ``online`` from the per-CPU files, as the kernel does.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from kagent.cgroups import hotplug
from kagent.cgroups.oom import OomEvents, V2OomWatch
from kagent.errors import DeadlineExceeded


def _cgroup(tmp_path, name: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "memory.events").write_text("oom 0\noom_kill 0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return str(d)


async def test_oom_events_none_lost_when_several_containers_oom_together(tmp_path):
    events = OomEvents()
    dirs = {cid: _cgroup(tmp_path, cid) for cid in ("a", "b", "c")}
    for cid, d in dirs.items():
        events.watch(cid, V2OomWatch(d))
    with open(os.path.join(dirs["a"], "memory.events"), "w") as f:
        f.write("oom 2\noom_kill 2\n")
    with open(os.path.join(dirs["c"], "memory.events"), "w") as f:
        f.write("oom 1\noom_kill 1\n")
    got = [await asyncio.wait_for(events.get(), 5) for _ in range(3)]
    assert sorted(got) == ["a", "a", "c"]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(events.get(), 0.2)  # each kill delivered once
    os.unlink(os.path.join(dirs["b"], "memory.events"))  # b's cgroup is gone: its watch is dropped
    for _ in range(50):
        if "b" not in events._watches:
            break
        await asyncio.sleep(0.01)
    assert set(events._watches) == {"a", "c"}
    events.unwatch("a")
    events.close()
    assert events._watches == {}


async def _kernel(root: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        online = {0}
        for name in os.listdir(root):
            path = os.path.join(root, name, "online")
            if name.startswith("cpu") and os.path.isfile(path):
                with open(path) as f:
                    if f.read().strip() == "1":
                        online.add(int(name[3:]))
        with open(os.path.join(root, "online"), "w") as f:
            f.write(",".join(map(str, sorted(online))) + "\n")
        await asyncio.sleep(0.005)


def _sysfs(tmp_path) -> str:
    root = tmp_path / "cpu"
    root.mkdir()
    (root / "online").write_text("0\n")
    (root / "cpu0").mkdir()  # the boot CPU has no online file
    for n in (1, 2, 3, 10):
        (root / f"cpu{n}").mkdir()
        (root / f"cpu{n}" / "online").write_text("0\n")
    (root / "cpufreq").mkdir()
    return str(root)


async def test_online_cpus_until_enough_are_online(tmp_path):
    root = _sysfs(tmp_path)
    stop = asyncio.Event()
    kernel = asyncio.create_task(_kernel(root, stop))
    try:
        assert await hotplug.online_cpus(1, root) == 1  # already enough: nothing written
        assert await hotplug.online_cpus(3, root, interval=0.01) == 3
        assert [open(os.path.join(root, f"cpu{n}", "online")).read().strip() for n in (1, 2, 3, 10)] == ["1", "1", "0", "0"]
        await asyncio.sleep(0.02)
        assert hotplug.guest_cpus(root) == "0,1,2"
        with pytest.raises(DeadlineExceeded, match="only 5 of 9 CPUs"):
            await hotplug.online_cpus(9, root, retries=3, interval=0.01)
    finally:
        stop.set()
        await kernel


def test_online_memory(tmp_path):
    root = tmp_path / "memory"
    for n, state in ((0, "1"), (1, "0"), (2, "0"), (32, "0")):
        (root / f"memory{n}").mkdir(parents=True)
        (root / f"memory{n}" / "online").write_text(state + "\n")
    (root / "auto_online_blocks").write_text("offline\n")
    assert hotplug.online_memory(str(root)) == 3
    assert hotplug.online_memory(str(root)) == 0
    assert hotplug.online_memory(str(tmp_path / "none")) == 0
