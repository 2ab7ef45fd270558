"""OnlineCPUMem's sysfs side: online hot-plugged CPUs and memory blocks (upstream sandbox.rs).

``online_cpus(n)`` returns once at least ``n`` CPUs are online: some VMMs
online them themselves, so it checks first; otherwise it writes "1" to the
``cpuN/online`` files that read 0 and re-checks, up to 100 times 50 ms apart,
as upstream.  ``online_memory()`` onlines every offline memory block.
``guest_cpus()`` is the list the cpuset rule then writes into the container
cgroups (Manager.update_cpuset).  The roots are parameters so that the tests
run on a fake sysfs.
"""

from __future__ import annotations

import asyncio
import os
import re

from kagent import errors
from kagent.log import get_logger

from . import fswrite
from .cpuset import parse_list

__all__ = ["online_cpus", "online_memory", "guest_cpus", "CPU_ROOT", "MEMORY_ROOT"]

log = get_logger("cgroups")

CPU_ROOT = "/sys/devices/system/cpu"
MEMORY_ROOT = "/sys/devices/system/memory"
RETRIES = 100
INTERVAL = 0.05


def guest_cpus(root: str = CPU_ROOT) -> str:
    """The online CPU list ("0-3"), as the kernel writes it."""
    with open(os.path.join(root, "online")) as f:
        return f.read().strip()


def _online_some(root: str, pattern: str, wanted: int) -> int:
    """Write "1" to offline ``<root>/<name>/online`` files (all when wanted < 0); the count."""
    names = [n for n in os.listdir(root) if re.fullmatch(pattern, n)]
    names.sort(key=lambda n: int(re.sub(r"\D", "", n)))
    count = 0
    for name in names:
        path = os.path.join(root, name, "online")
        try:
            with open(path) as f:
                if "0" not in f.read().strip():
                    continue
            fswrite.write_batch([(path, "1")])
        except OSError as exc:
            log.debug("could not online", path=path, error=str(exc))
            continue
        count += 1
        if 0 < wanted <= count:
            break
    return count


async def online_cpus(nb_cpus: int, root: str = CPU_ROOT, *, retries: int = RETRIES,
                      interval: float = INTERVAL) -> int:
    """Online CPUs until ``nb_cpus`` are online; the number online.  DeadlineExceeded if it never happens."""
    online = 0
    for _ in range(retries):
        # re-read first: a VMM (or a slow kernel) may have onlined them meanwhile
        online = len(parse_list(guest_cpus(root)))
        if online >= nb_cpus:
            return online
        _online_some(root, r"cpu[0-9]+", nb_cpus - online)
        online = len(parse_list(guest_cpus(root)))
        if online >= nb_cpus:
            return online
        await asyncio.sleep(interval)
    raise errors.DeadlineExceeded(f"only {online} of {nb_cpus} CPUs came online after {retries} tries")


def online_memory(root: str = MEMORY_ROOT) -> int:
    """Online every offline memory block; the number onlined."""
    if not os.path.isdir(root):
        return 0
    return _online_some(root, r"memory[0-9]+", -1)
