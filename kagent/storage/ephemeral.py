"""ephemeral: memory-backed volumes — tmpfs (emptyDir medium Memory, the sandbox's shm)
and hugetlbfs (hugepages-<size> volumes).

tmpfs: ``fsgid=N`` is kata's, not the kernel's: the tmpfs is mounted with the other
options (upstream drops them all, losing e.g. the shm ``size=``; kagent keeps them, as
UpdateEphemeralMounts does), then the root is given group N with setgid.

hugetlbfs: the pages must exist before the mount can use them: ``size/pagesize`` is
written to ``<sysfs>/kernel/mm/hugepages/hugepages-<pagesize in kB>kB/nr_hugepages`` and
read back, because the kernel may allocate fewer than asked.
"""

from __future__ import annotations

import asyncio
import os

from kagent.errors import FailedPrecondition, InvalidArgument
from kagent.log import get_logger
from kagent.storage.common import Device, StorageSpec, mount_storage, option_value, storage_error
from kagent.storage.context import Context

log = get_logger("storage")

EPHEMERAL = "ephemeral"
HUGETLBFS = "hugetlbfs"
FSGID = "fsgid"


def hugepage_request(options: tuple[str, ...]) -> tuple[int, int]:
    """(pagesize, size) in bytes from ``pagesize=`` and ``size=``."""
    values = {}
    for key in ("pagesize", "size"):
        text = option_value(options, key)
        if text is None:
            raise InvalidArgument(f"hugetlbfs storage: no {key}= option in {','.join(options)!r}")
        if not (text.isascii() and text.isdigit()):
            raise InvalidArgument(f"hugetlbfs storage: {key}={text!r} is not a number of bytes")
        values[key] = int(text)
    if values["pagesize"] < 1024:
        raise InvalidArgument(f"hugetlbfs storage: pagesize={values['pagesize']} is too small")
    return values["pagesize"], values["size"]


def allocate_hugepages(sysfs_root: str, pagesize: int, size: int) -> str:
    """Ask the kernel for size/pagesize pages; fail unless it gave them all."""
    path = os.path.join(sysfs_root, "kernel", "mm", "hugepages",
                        f"hugepages-{pagesize // 1024}kB", "nr_hugepages")
    pages = size // pagesize
    if not os.path.exists(path):
        raise FailedPrecondition(f"hugetlbfs storage: the kernel has no {pagesize // 1024} kB "
                                 f"hugepages ({path} is missing)")
    try:
        with open(path, "w") as f:
            f.write(str(pages))
        with open(path) as f:
            got_text = f.read().strip()
    except OSError as exc:
        raise storage_error(exc, f"hugetlbfs storage: allocate {pages} pages through {path}") from None
    if got_text != str(pages):
        raise FailedPrecondition(f"hugetlbfs storage: only {got_text or 'no'} of {pages} hugepages "
                                 f"of {pagesize // 1024} kB could be allocated")
    log.info("hugepages allocated", pages=pages, pagesize_kb=pagesize // 1024)
    return path


def _parse_gid(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFFFFFE:
        raise InvalidArgument(f"ephemeral storage: fsgid={text!r} is not a group id")
    return int(text)


def _mount_tmpfs(spec: StorageSpec, mountinfo_path: str) -> Device:
    fsgid_text = option_value(spec.options, FSGID)
    gid = _parse_gid(fsgid_text) if fsgid_text is not None else None
    options = [o for o in spec.options if not o.startswith(FSGID + "=")]
    dev = mount_storage(spec, source=spec.source or "tmpfs", fstype=spec.fstype or "tmpfs",
                        options=options, mountinfo_path=mountinfo_path)
    if gid is not None:
        try:
            os.chown(spec.mount_point, -1, gid)
            mode = os.stat(spec.mount_point).st_mode
            os.chmod(spec.mount_point, (mode & 0o7777) | 0o2000)  # new files inherit the group
        except OSError as exc:
            dev.release_sync()
            raise storage_error(exc, f"ephemeral storage: give {spec.mount_point} to group {gid}") from None
    return dev


def _mount_hugetlbfs(spec: StorageSpec, sysfs_root: str, mountinfo_path: str) -> Device:
    pagesize, size = hugepage_request(spec.options)
    allocate_hugepages(sysfs_root, pagesize, size)
    return mount_storage(spec, source=spec.source or "nodev", mountinfo_path=mountinfo_path)


class EphemeralHandler:
    drivers = (EPHEMERAL,)

    async def create(self, spec: StorageSpec, ctx: Context) -> Device:
        if spec.fstype == HUGETLBFS:
            dev = await asyncio.to_thread(_mount_hugetlbfs, spec, ctx.paths.sysfs_root, ctx.paths.mountinfo)
        else:
            dev = await asyncio.to_thread(_mount_tmpfs, spec, ctx.paths.mountinfo)
        # emptyDir data: it must survive a container restart (RemoveContainer, then
        # CreateContainer with the same storage), so it lives as long as the sandbox
        dev.sandbox_lifetime = True
        return dev
