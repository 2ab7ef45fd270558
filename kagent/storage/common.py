"""What every storage driver shares: the request, the mounted result, and the plain mount.

A driver turns one ``agent_pb2.Storage`` (as a ``StorageSpec``) into a ``Device``: what it
mounted and created, so that ``Device.release`` can undo exactly that — umount what we
mounted, rmdir what we created (only when empty), never anything that was there before.

``mount_storage`` is upstream's ``common_storage_handler``: skip a premounted shared fs,
create the mount point, mount (a bind in two steps, so ``ro`` takes), then apply
``fs_group``.  Everything here is synchronous: the drivers run it in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kagent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    refuse_nul,
)
from kagent.log import get_logger
from kagent.runtime import mountinfo, mounts, syscalls
from kagent.runtime.errors import SetupError
from kagent.storage.ownership import FsGroup, set_ownership

if TYPE_CHECKING:
    from kagent.protocols import agent_pb2

log = get_logger("storage")

#: the virtio-fs/9p tag of the sandbox share; an image may mount it before the agent starts
KATA_SHARED = "kataShared"
#: options of this prefix are kata's markers for the agent, never kernel mount data
KATA_OPTION_PREFIX = "io.katacontainers."
MOUNTINFO = "/proc/self/mountinfo"
#: the flags a bind mount only gets from a second, remount call
_REMOUNT_FLAGS = (syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
                  | syscalls.MS_NOATIME | syscalls.MS_NODIRATIME | syscalls.MS_RELATIME
                  | syscalls.MS_STRICTATIME | syscalls.MS_NOSYMFOLLOW)


@dataclass(frozen=True)
class StorageSpec:
    """One Storage request, checked: the mount point is absolute and normalised."""

    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str
    driver_options: tuple[str, ...] = ()
    fs_group: FsGroup | None = None
    shared: bool = False

    @classmethod
    def from_proto(cls, s: agent_pb2.Storage) -> StorageSpec:
        fs_group = None
        if s.HasField("fs_group"):
            fs_group = FsGroup(s.fs_group.group_id, int(s.fs_group.group_change_policy))
        return cls.make(driver=s.driver, source=s.source, fstype=s.fstype, options=list(s.options),
                        mount_point=s.mount_point, driver_options=list(s.driver_options),
                        fs_group=fs_group, shared=s.shared)

    @classmethod
    def make(cls, *, driver: str, mount_point: str, source: str = "", fstype: str = "",
             options: Iterable[str] = (), driver_options: Iterable[str] = (),
             fs_group: FsGroup | None = None, shared: bool = False) -> StorageSpec:
        what = f"{driver or 'storage'} storage"
        options, driver_options = tuple(options), tuple(driver_options)
        # every string here reaches a syscall (or ctypes, which would cut it at the NUL)
        for value, name in ((driver, "driver"), (source, "source"), (fstype, "fstype"),
                            *((o, "option") for o in options), *((o, "driver option") for o in driver_options)):
            refuse_nul(value, f"{what}: {name}")
        return cls(driver, source, fstype, tuple(split_options(options)),
                   check_path(mount_point, f"{what}: mount point"), driver_options, fs_group, shared)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def check_path(path: str, what: str) -> str:
    """An absolute path without ``..``, normalised (the host sends trailing slashes)."""
    refuse_nul(path, what)
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r} must not contain '..'")
    return os.path.normpath(path)


def split_options(options: Iterable[str]) -> list[str]:
    """Option strings → single options: hosts send both ``["ro", "nodev"]`` and
    ``["trans=virtio,version=9p2000.L"]``; commas inside double quotes (an SELinux
    ``context="a,b"``) do not split."""
    out: list[str] = []
    for opt in options:
        cur, quoted = [], False
        for ch in opt:
            if ch == '"':
                quoted = not quoted
            if ch == "," and not quoted:
                out.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        out.append("".join(cur))
    return [o.strip() for o in out if o.strip()]


def option_value(options: Iterable[str], key: str) -> str | None:
    """The value of the last ``key=value`` option, if any."""
    found = None
    for opt in options:
        k, sep, v = opt.partition("=")
        if sep and k == key:
            found = v
    return found


def mount_options(options: Iterable[str]) -> mounts.Options:
    """Flags and data for mount(2); kata's own markers are not passed to the kernel."""
    return mounts.parse_options([o for o in options if not o.startswith(KATA_OPTION_PREFIX)])


def storage_error(exc: BaseException, what: str) -> AgentError:
    """A failure of the kernel or the filesystem → the domain error naming what failed."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, SetupError):
        text = f"{what}: {exc.message}"
        code = exc.errno
    elif isinstance(exc, OSError):
        text = f"{what}: {exc.strerror or exc}"
        if exc.filename and str(exc.filename) not in text:
            text += f" ({exc.filename})"
        code = exc.errno
    else:
        return AgentError(f"{what}: {exc}")
    if code == errno.ENOENT:
        return NotFound(text)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(text)
    if code in (errno.EINVAL, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ENOTBLK):
        return InvalidArgument(text)
    if code in (errno.ENODEV, errno.EBUSY, errno.EEXIST, errno.ENOTEMPTY):
        return FailedPrecondition(text)
    return AgentError(text)


# --- mount table ------------------------------------------------------------------------------


def mounted_at(path: str, mountinfo_path: str = MOUNTINFO) -> list[mountinfo.Mount]:
    """The mounts stacked on ``path`` (oldest first)."""
    table = mountinfo.read_file(mountinfo_path)
    return [m for m in table if m.mount_point == path]


def is_mounted(path: str, fstype: str | None = None, mountinfo_path: str = MOUNTINFO) -> bool:
    found = mounted_at(path, mountinfo_path)
    if fstype is None:
        return bool(found)
    return bool(found) and found[-1].fstype == fstype


# --- the result of a driver -------------------------------------------------------------------


@dataclass
class Device:
    """What a driver did for one mount point, so that it can be undone."""

    driver: str
    mount_point: str
    mounted: bool = False  # we mounted something at mount_point
    created: list[str] = field(default_factory=list)  # paths we created, parents first
    #: kept until the sandbox ends even at refcount zero (emptyDir-like data, see manager)
    sandbox_lifetime: bool = False
    seq: int = 0  # creation order, set by the manager (release goes newest first)

    def release_sync(self) -> None:
        """Umount what we mounted, then remove the (empty) paths we created."""
        if self.mounted:
            umount(self.mount_point, f"umount {self.driver} storage")
            self.mounted = False
        remove_created(self.created)
        self.created = []

    async def release(self) -> None:
        await asyncio.to_thread(self.release_sync)


def umount(path: str, what: str) -> None:
    """umount2; a busy mount is detached (its users are gone or going), not left behind."""
    try:
        syscalls.umount2(path, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a mount point any more
            return
        if exc.errno != errno.EBUSY:
            raise storage_error(exc, f"{what} at {path}") from None
        log.warning("mount busy, detaching it", mount_point=path)
        try:
            syscalls.umount2(path, syscalls.MNT_DETACH)
        except OSError as exc2:
            raise storage_error(exc2, f"{what} at {path}") from None


def remove_created(paths: list[str]) -> None:
    """rmdir (or unlink an empty file) each path, deepest first; what is not empty stays."""
    for path in reversed(paths):
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(path)
        except OSError:
            continue  # not empty, busy or gone: leave it (and its parents fail the same way)


def make_dirs(path: str, mode: int = 0o755) -> list[str]:
    """mkdir -p; returns the directories this call created, parents first."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to remove
        created.append(d)
    return created


def make_mount_point(mount_point: str, *, file: bool) -> list[str]:
    """The directory (or, for a bind of a file, the empty file) to mount on."""
    if not file:
        return make_dirs(mount_point)
    created = make_dirs(os.path.dirname(mount_point))
    try:
        fd = os.open(mount_point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return created
    os.close(fd)
    return [*created, mount_point]


# --- upstream's common_storage_handler --------------------------------------------------------


def mount_storage(spec: StorageSpec, *, source: str | None = None, fstype: str | None = None,
                  options: Iterable[str] | None = None,
                  mountinfo_path: str = MOUNTINFO) -> Device:
    """Mount ``spec`` (with ``source``/``fstype``/``options`` overridden if given), then
    apply ``fs_group``.  On failure nothing of this call is left behind."""
    source = spec.source if source is None else source
    fstype = spec.fstype if fstype is None else fstype
    opts = mount_options(spec.options if options is None else options)
    mp = spec.mount_point
    dev = Device(spec.driver, mp)
    what = f"mount {spec.driver} storage {source or fstype!r} at {mp}"

    if source == KATA_SHARED and is_mounted(mp, mountinfo_path=mountinfo_path):
        log.warning("shared filesystem already mounted, not mounting it again", mount_point=mp)
        return dev
    bind = fstype == "bind" or opts.bind
    try:
        try:
            is_file = bind and not stat.S_ISDIR(os.stat(source).st_mode)
        except OSError as exc:
            raise storage_error(exc, f"{what}: source") from None
        try:
            dev.created = make_mount_point(mp, file=is_file)
        except OSError as exc:
            raise storage_error(exc, f"{what}: create the mount point") from None
        if bind:
            _bind(source, mp, opts, what)
            dev.mounted = True
        elif fstype and is_mounted(mp, fstype, mountinfo_path):
            log.info("already mounted with the same type, not mounting again", mount_point=mp,
                     fstype=fstype)
        else:
            try:
                syscalls.mount(source or fstype or "none", mp, fstype or None,
                               opts.flags & ~syscalls.MS_REC, opts.data_str)
            except OSError as exc:
                raise storage_error(exc, what) from None
            dev.mounted = True
        log.info("storage mounted", driver=spec.driver, source=source, mount_point=mp,
                 fstype=fstype, options=",".join(spec.options))
        if spec.fs_group is not None:
            try:
                set_ownership(mp, spec.fs_group, read_only=spec.read_only)
            except OSError as exc:
                raise storage_error(exc, f"set fs_group {spec.fs_group.gid} on {mp}") from None
    except BaseException:
        dev.release_sync()
        raise
    return dev


def _bind(source: str, mp: str, opts: mounts.Options, what: str) -> None:
    flags = syscalls.MS_BIND | (opts.flags & syscalls.MS_REC)
    try:
        syscalls.mount(source, mp, None, flags)
    except OSError as exc:
        raise storage_error(exc, what) from None
    if not opts.flags & _REMOUNT_FLAGS:
        return
    try:
        # MS_BIND ignores ro/nosuid/...: they take effect only on a remount
        mounts.bind_remount(mp, opts.flags, f"bind {source}")
    except (SetupError, OSError) as exc:
        umount(mp, "undo bind")
        raise storage_error(exc, what) from None
