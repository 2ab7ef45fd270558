"""The spec's ``mounts``: option strings → flags and data, and one mount at a time.

Bind mounts take two steps: the kernel ignores most flags on MS_BIND, so
ro/nosuid/nodev/noexec/atime flags need a remount.  A remount must keep the
flags the kernel has *locked* on the source (e.g. nodev on /proc seen from a
user namespace), else EPERM: on EPERM it is retried with the source's current
flags added, as runc does.  Propagation flags are separate mount calls.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from . import cgroupfs, securejoin, syscalls
from .errors import BAD_MOUNT, BAD_MOUNT_POINT, NO_SUCH_PATH, InvalidSpec, step
from .syscalls import (
    MS_BIND,
    MS_DIRSYNC,
    MS_I_VERSION,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SILENT,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    MS_UNBINDABLE,
)

Warn = Callable[[str], None]

#: option → (set?, flag)
FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (True, MS_RDONLY),
    "rw": (False, MS_RDONLY),
    "nosuid": (True, MS_NOSUID),
    "suid": (False, MS_NOSUID),
    "nodev": (True, MS_NODEV),
    "dev": (False, MS_NODEV),
    "noexec": (True, MS_NOEXEC),
    "exec": (False, MS_NOEXEC),
    "sync": (True, MS_SYNCHRONOUS),
    "async": (False, MS_SYNCHRONOUS),
    "dirsync": (True, MS_DIRSYNC),
    "remount": (True, MS_REMOUNT),
    "mand": (True, MS_MANDLOCK),
    "nomand": (False, MS_MANDLOCK),
    "noatime": (True, MS_NOATIME),
    "atime": (False, MS_NOATIME),
    "nodiratime": (True, MS_NODIRATIME),
    "diratime": (False, MS_NODIRATIME),
    "relatime": (True, MS_RELATIME),
    "norelatime": (False, MS_RELATIME),
    "strictatime": (True, MS_STRICTATIME),
    "nostrictatime": (False, MS_STRICTATIME),
    "iversion": (True, MS_I_VERSION),
    "noiversion": (False, MS_I_VERSION),
    "lazytime": (True, MS_LAZYTIME),
    "nolazytime": (False, MS_LAZYTIME),
    "nosymfollow": (True, MS_NOSYMFOLLOW),
    "symfollow": (False, MS_NOSYMFOLLOW),
    "silent": (True, MS_SILENT),
    "loud": (False, MS_SILENT),
    "bind": (True, MS_BIND),
    "rbind": (True, MS_BIND | MS_REC),
    "defaults": (True, 0),
}

PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

#: options of other runtimes or of mount(8) that are not kernel mount data
_IGNORED = {
    "tmpcopyup",
    "rro",
    "rrw",
    "rnosuid",
    "rsuid",
    "rnodev",
    "rdev",
    "rnoexec",
    "rexec",
    "nofail",
    "auto",
    "noauto",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
}

#: flags a bind remount may change
_REMOUNT_MASK = (
    MS_RDONLY
    | MS_NOSUID
    | MS_NODEV
    | MS_NOEXEC
    | MS_NOATIME
    | MS_NODIRATIME
    | MS_RELATIME
    | MS_STRICTATIME
    | MS_NOSYMFOLLOW
)

# statvfs f_flag bits → mount flags (ST_RELATIME differs from MS_RELATIME)
_ST_TO_MS = (
    (1, MS_RDONLY),
    (2, MS_NOSUID),
    (4, MS_NODEV),
    (8, MS_NOEXEC),
    (1024, MS_NOATIME),
    (2048, MS_NODIRATIME),
    (4096, MS_RELATIME),
    (256, MS_NOSYMFOLLOW),
)


@dataclass
class Options:
    flags: int = 0
    propagation: list[int] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def bind(self) -> bool:
        return bool(self.flags & MS_BIND)

    @property
    def data_str(self) -> str | None:
        return ",".join(self.data) or None


def parse_options(options: list[str]) -> Options:
    """OCI/mount(8) option strings → flags, propagation flags and filesystem data."""
    out = Options()
    for opt in options:
        if opt in FLAGS:
            setting, flag = FLAGS[opt]
            out.flags = out.flags | flag if setting else out.flags & ~flag
        elif opt in PROPAGATION:
            out.propagation.append(PROPAGATION[opt])
        elif opt in _IGNORED or opt.startswith("X-") or opt.startswith("x-"):
            out.ignored.append(opt)
        else:
            out.data.append(opt)
    return out


def locked_flags(path: str) -> int:
    """The mount flags ``path``'s mount has now (statvfs), as MS_* bits."""
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f & st)


def bind_remount(path: str, flags: int, what: str) -> None:
    """Apply ``flags`` to an existing bind mount, keeping the locked ones if needed."""
    want = flags & _REMOUNT_MASK
    with step(f"remount {what} at {path}", path):
        try:
            syscalls.mount(None, path, None, MS_BIND | MS_REMOUNT | want)
        except PermissionError:
            syscalls.mount(None, path, None, MS_BIND | MS_REMOUNT | want | locked_flags(path))


def _resolve_source(source: str, bundle: str) -> str:
    return source if os.path.isabs(source) else os.path.join(bundle, source)


def mount_one(rootfs: str, bundle: str, m: dict, warn: Warn, *, in_cgroupns: bool) -> None:
    """Mount one ``mounts[]`` entry under ``rootfs`` (before pivot_root)."""
    dest_in = m.get("destination") or ""
    if not dest_in.startswith("/"):
        raise InvalidSpec(
            "mount", f"mount: destination {dest_in!r} must be an absolute path", path=dest_in
        )
    kind = m.get("type") or ""
    opts = parse_options(list(m.get("options") or []))
    if kind == "bind":
        opts.flags |= MS_BIND
    if opts.ignored:
        warn(f"mount {dest_in}: ignoring options {','.join(opts.ignored)}")
    source = m.get("source") or kind or "none"
    dest = securejoin.secure_join(rootfs, dest_in)

    if kind == "cgroup":
        cgroupfs.mount(dest, opts.flags, warn, in_cgroupns=in_cgroupns)
        return

    if opts.bind:
        source = _resolve_source(source, bundle)
        what = f"bind {source}"
        with step(f"mount {what} at {dest}: source", source, invalid=NO_SUCH_PATH):
            is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        with step(f"mount {what} at {dest}: create mount point", dest, invalid=BAD_MOUNT_POINT):
            if is_dir:
                securejoin.mkdir_all(rootfs, dest_in)
            else:
                securejoin.create_file(rootfs, dest_in)
        with step(f"mount {what} at {dest}", dest):
            syscalls.mount(source, dest, None, opts.flags & (MS_BIND | MS_REC))
        if opts.flags & _REMOUNT_MASK:
            bind_remount(dest, opts.flags, what)
    else:
        what = kind or source
        with step(f"mount {what} at {dest}: create mount point", dest, invalid=BAD_MOUNT_POINT):
            securejoin.mkdir_all(rootfs, dest_in)
        _mount_fs(source, dest, kind, opts, what)

    for prop in opts.propagation:
        with step(f"set propagation of {dest}", dest):
            syscalls.mount(None, dest, None, prop)


def _mount_fs(source: str, dest: str, kind: str, opts: Options, what: str) -> None:
    flags = opts.flags & ~MS_REC
    shown = f" with {opts.data_str}" if opts.data else ""  # EINVAL says no more than that
    with step(f"mount {what} at {dest}{shown}", dest, invalid=BAD_MOUNT):
        try:
            syscalls.mount(source, dest, kind, flags, opts.data_str)
            return
        except PermissionError:
            # sysfs cannot be mounted in a network namespace we do not own: bind the host's.
            if kind != "sysfs":
                raise
        except OSError as exc:
            # devpts gid= names a group the user namespace may not map.
            if (
                kind != "devpts"
                or exc.errno != 22
                or not any(d.startswith("gid=") for d in opts.data)
            ):
                raise
            data = ",".join(d for d in opts.data if not d.startswith("gid=")) or None
            syscalls.mount(source, dest, kind, flags, data)
            return
    with step(f"mount {what} at {dest}: bind /sys", dest):  # our fallback: its errors are ours
        syscalls.mount("/sys", dest, None, MS_BIND | MS_REC)
    if flags & _REMOUNT_MASK:
        bind_remount(dest, flags, "sysfs")
