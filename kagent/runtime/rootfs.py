"""The container's root filesystem, built inside its new mount namespace.

Order, and why:
1. ``/`` made rprivate first: nothing we mount may propagate to the host, and
   pivot_root fails with EINVAL under a shared parent.
2. The rootfs bind-mounted onto itself: pivot_root needs a mount point (EBUSY).
3. The spec's mounts in order, then /dev nodes and links.
4. pivot_root(".", ".") and a lazy unmount of the old root stacked under it;
   on an initramfs root (which cannot be pivoted) MS_MOVE + chroot instead.
5. After the pivot (and after sysctls, which need a writable /proc/sys):
   readonly paths, masked paths, then the read-only root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from . import devices, mountinfo, mounts, syscalls
from .errors import NO_SUCH_PATH, InvalidSpec, step
from .syscalls import MS_BIND, MS_PRIVATE, MS_RDONLY, MS_REC, MS_SLAVE

Warn = Callable[[str], None]


def root_path(spec: dict, bundle: str) -> str:
    """root.path resolved, in the worker before anything is forked: a path that leads
    nowhere, or where the agent may not go (EACCES, e.g. another process's /proc/N/cwd),
    is the spec's mistake."""
    root = (spec.get("root") or {}).get("path") or "rootfs"
    path = root if os.path.isabs(root) else os.path.join(bundle, root)
    with step(f"root.path {root}", path, invalid=NO_SUCH_PATH | {errno.EACCES}):
        real = os.path.realpath(path, strict=True)
        if not stat.S_ISDIR(os.stat(real).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), real)
    if real == "/":
        raise InvalidSpec("spec", f"spec: root.path {root} is the guest's own root", path=root)
    return real


def prepare(rootfs: str) -> None:
    with step("make / rprivate", "/"):
        syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
    with step(f"bind the rootfs {rootfs} onto itself", rootfs):
        if not os.path.isdir(rootfs):
            raise FileNotFoundError(2, "No such file or directory", rootfs)
        syscalls.mount(rootfs, rootfs, None, MS_BIND | MS_REC)


def mount_all(rootfs: str, bundle: str, spec: dict, warn: Warn, *, in_cgroupns: bool) -> None:
    for m in spec.get("mounts") or []:
        mounts.mount_one(rootfs, bundle, m, warn, in_cgroupns=in_cgroupns)
    if devices.needs_dev_setup(spec):
        devices.create_devices(rootfs, spec)
        devices.create_links(rootfs, spec)


def is_initramfs() -> bool:
    """Whether "/" is the kernel's initial rootfs, which pivot_root refuses."""
    return mountinfo.root_fstype(mountinfo.read()) == "rootfs"


def pivot(rootfs: str) -> None:
    with step(f"enter the rootfs {rootfs}", rootfs):
        os.chdir(rootfs)
    if is_initramfs():
        with step(f"move the rootfs {rootfs} to /", rootfs):
            syscalls.mount(rootfs, "/", None, syscalls.MS_MOVE)
            os.chroot(".")
    else:
        with step(f"pivot_root into {rootfs}", rootfs):
            syscalls.pivot_root(".", ".")
            # The old root is now stacked under "."; keep its unmount from propagating anywhere.
            syscalls.mount(None, ".", None, MS_SLAVE | MS_REC)
            syscalls.umount2(".", syscalls.MNT_DETACH)
    with step("chdir /", "/"):
        os.chdir("/")


def readonly_paths(paths: list[str]) -> None:
    for path in paths:
        if not os.path.lexists(path):
            continue
        with step(f"make {path} read-only", path):
            syscalls.mount(path, path, None, MS_BIND | MS_REC)
        mounts.bind_remount(path, MS_RDONLY | mounts.locked_flags(path), "read-only path")


def masked_paths(paths: list[str]) -> None:
    for path in paths:
        with step(f"mask {path}", path):
            try:
                is_dir = os.path.isdir(path) and not os.path.islink(path)
            except OSError:
                continue
            if not os.path.lexists(path):
                continue
            if is_dir:
                syscalls.mount("tmpfs", path, "tmpfs", MS_RDONLY)
            else:
                syscalls.mount("/dev/null", path, None, MS_BIND)


def readonly_root() -> None:
    mounts.bind_remount("/", MS_RDONLY | mounts.locked_flags("/"), "the root read-only")


def set_propagation(spec: dict) -> None:
    prop = (spec.get("linux") or {}).get("rootfsPropagation")
    if not prop:
        return
    if prop not in mounts.PROPAGATION:
        raise InvalidSpec("rootfs propagation", f"rootfs propagation: unknown value {prop!r}")
    with step(f"set rootfs propagation {prop}", "/"):
        syscalls.mount(None, "/", None, mounts.PROPAGATION[prop])
