"""The raw syscalls Python 3.11 lacks, as thin wrappers with no logic.

Each wrapper makes one call and, on failure, raises ``OSError(errno,
"<call>(<args>): <strerror>")`` so that the errno picks the right subclass
(PermissionError, FileNotFoundError, ...) and the text names the call and the
paths involved.  The logic that uses them lives in the other runtime modules.

Two twins with the same names and the same errors: the ctypes functions below
and the compiled ``kagent._fast.syscalls``.  The public names are bound to the
compiled module when it loads (``KAGENT_NO_EXTENSIONS=1`` selects this file's
twin).  Callers must write ``syscalls.mount(...)`` rather than importing the
names, so that ``select()`` can rebind them (the tests run both twins).
"""

from __future__ import annotations

import ctypes
import os
import platform
import types

from kagent import _fast

__all__ = [
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "sethostname",
    "setdomainname",
    "capget",
    "capset",
    "prctl",
    "close_range",
]

# clone/unshare/setns flags (linux/sched.h)
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2 flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLOSE_RANGE_CLOEXEC = 1 << 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# glibc has no pivot_root() wrapper everywhere; the numbers differ per arch.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "s390x": 217, "ppc64le": 203}


def _path(p: str | bytes | os.PathLike | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def _show(p: str | bytes | os.PathLike | None) -> str:
    return repr(None if p is None else os.fsdecode(p))


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def mount(source, target, fstype, flags: int = 0, data=None) -> None:
    if _libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data)) != 0:
        raise _fail(f"mount({_show(source)}, {_show(target)}, {_show(fstype)}, {flags:#x})")


def umount2(target, flags: int = 0) -> None:
    if _libc.umount2(_path(target), flags) != 0:
        raise _fail(f"umount2({_show(target)}, {flags:#x})")


def pivot_root(new_root, put_old) -> None:
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(
            38,
            f"pivot_root({_show(new_root)}, {_show(put_old)}): no syscall number for {platform.machine()}",
        )
    args = (ctypes.c_char_p(_path(new_root)), ctypes.c_char_p(_path(put_old)))
    if _libc.syscall(ctypes.c_long(nr), *args) != 0:
        raise _fail(f"pivot_root({_show(new_root)}, {_show(put_old)})")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise _fail(f"setns({fd}, {nstype:#x})")


def sethostname(name: str | bytes) -> None:
    raw = os.fsencode(name)
    if _libc.sethostname(raw, len(raw)) != 0:
        raise _fail(f"sethostname({_show(name)})")


def setdomainname(name: str | bytes) -> None:
    raw = os.fsencode(name)
    if _libc.setdomainname(raw, len(raw)) != 0:
        raise _fail(f"setdomainname({_show(name)})")


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) sets, 64-bit each."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise _fail("capget()")
    return tuple(
        getattr(data[0], f) | (getattr(data[1], f) << 32)
        for f in ("effective", "permitted", "inheritable")
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        raise _fail(f"capset({effective:#x}, {permitted:#x}, {inheritable:#x})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl with integer arguments (PR_SET_NAME takes bytes as arg2)."""
    if isinstance(arg2, bytes):
        buf = ctypes.create_string_buffer(arg2)
        rc = _libc.prctl(option, ctypes.cast(buf, ctypes.c_void_p).value, arg3, arg4, arg5)
        shown = repr(arg2)
    else:
        rc = _libc.prctl(option, arg2, arg3, arg4, arg5)
        shown = str(arg2)
    if rc < 0:
        raise _fail(f"prctl({option}, {shown})")
    return rc


def close_range(first: int, last: int, flags: int = 0) -> None:
    if _libc.close_range(ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_int(flags)) != 0:
        raise _fail(f"close_range({first}, {last}, {flags:#x})")


#: this file's ctypes functions, kept whichever twin is bound below
PURE = types.SimpleNamespace(**{name: globals()[name] for name in __all__})
COMPILED = _fast.load("syscalls")
IMPLEMENTATION = "pure"


def select(implementation: str) -> None:
    """Bind the public names to one twin: "compiled" or "pure" (tests use both)."""
    global IMPLEMENTATION
    source: object
    if implementation == "compiled":
        if COMPILED is None:
            raise RuntimeError(f"the compiled syscalls module is not loaded ({_fast.status()})")
        source = COMPILED
    elif implementation == "pure":
        source = PURE
    else:
        raise ValueError(f"unknown syscalls implementation {implementation!r}")
    for name in __all__:
        globals()[name] = getattr(source, name)
    IMPLEMENTATION = implementation


select("compiled" if COMPILED is not None else "pure")
