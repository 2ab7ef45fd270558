"""``linux.seccomp`` → a libseccomp filter (our own small ctypes binding to libseccomp.so.2).

The filter is compiled early in the child (a bad profile fails the set-up
before anything is mounted) and loaded as late as possible:
- with noNewPrivileges, right before execve, so our own set-up syscalls are
  not filtered;
- without it, loading needs CAP_SYS_ADMIN, so before the capabilities are
  dropped (runc does the same).
libseccomp must not set no_new_privs on its own (SCMP_FLTATR_CTL_NNP = 0):
that is the spec's decision.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
from collections.abc import Callable

from .errors import InvalidSpec, SetupError

Warn = Callable[[str], None]

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000


def SCMP_ACT_ERRNO(e: int) -> int:  # noqa: N802 - libseccomp's name
    return 0x00050000 | (e & 0xFFFF)


def SCMP_ACT_TRACE(e: int) -> int:  # noqa: N802
    return 0x7FF00000 | (e & 0xFFFF)


#: OCI comparison operators → enum scmp_compare
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

# enum scmp_filter_attr
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_ATTR_CTL_SSB = 7
_FLAG_ATTRS = {
    "SECCOMP_FILTER_FLAG_TSYNC": _ATTR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": _ATTR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": _ATTR_CTL_SSB,
}
_NR_SCMP_ERROR = -1


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
        except OSError as exc:
            raise SetupError(
                "seccomp", f"seccomp: libseccomp.so.2 is not available ({exc})"
            ) from exc
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


def action(name: str, errno_ret: int | None) -> int:
    """An OCI action name (and errnoRet) → libseccomp's action value."""
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return SCMP_ACT_KILL_THREAD
    if name == "SCMP_ACT_KILL_PROCESS":
        return SCMP_ACT_KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return SCMP_ACT_TRAP
    if name == "SCMP_ACT_ERRNO":
        return SCMP_ACT_ERRNO(errno_mod.EPERM if errno_ret is None else int(errno_ret))
    if name == "SCMP_ACT_TRACE":
        return SCMP_ACT_TRACE(errno_mod.EPERM if errno_ret is None else int(errno_ret))
    if name == "SCMP_ACT_ALLOW":
        return SCMP_ACT_ALLOW
    if name == "SCMP_ACT_LOG":
        return SCMP_ACT_LOG
    raise InvalidSpec("seccomp", f"seccomp: unsupported action {name!r}")


def arch_token(name: str) -> int:
    """ "SCMP_ARCH_X86_64" → libseccomp's token for "x86_64" (0 if unknown)."""
    short = name.removeprefix("SCMP_ARCH_").lower()
    return library().seccomp_arch_resolve_name(short.encode())


class Filter:
    """A compiled (not yet loaded) seccomp filter."""

    def __init__(self, ctx: int) -> None:
        self._ctx = ctx

    def load(self) -> None:
        rc = library().seccomp_load(self._ctx)
        if rc < 0:
            raise SetupError("load seccomp filter", errno=-rc)

    def release(self) -> None:
        if self._ctx:
            library().seccomp_release(self._ctx)
            self._ctx = 0


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise SetupError(
            "seccomp",
            f"seccomp: {what}: [Errno {-rc}] {errno_mod.errorcode.get(-rc, -rc)}",
            errno=-rc,
        )


def compile(profile: dict | None, warn: Warn) -> Filter | None:  # noqa: A001 - "compile a profile"
    if not profile:
        return None
    if profile.get("listenerPath"):
        raise InvalidSpec("seccomp", "seccomp: SCMP_ACT_NOTIFY listeners are not supported")
    lib = library()
    default = action(profile.get("defaultAction", "SCMP_ACT_ALLOW"), profile.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SetupError(
            "seccomp", f"seccomp: cannot initialise a filter with default action {default:#x}"
        )
    flt = Filter(ctx)
    try:
        _check(lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 0), "clear the no_new_privs attribute")
        for arch in profile.get("architectures") or []:
            token = arch_token(arch)
            if not token:
                warn(f"seccomp: unknown architecture {arch!r}: ignored")
                continue
            rc = lib.seccomp_arch_add(ctx, token)
            if rc < 0 and rc != -errno_mod.EEXIST:
                _check(rc, f"add architecture {arch}")
        for flag in profile.get("flags") or []:
            attr = _FLAG_ATTRS.get(flag)
            if attr is None:
                warn(f"seccomp: flag {flag!r} is not supported: ignored")
            elif lib.seccomp_attr_set(ctx, attr, 1) < 0:
                warn(f"seccomp: flag {flag!r} is not supported by this libseccomp: ignored")
        for rule in profile.get("syscalls") or []:
            _add_rule(lib, ctx, rule, default, warn)
    except BaseException:
        flt.release()
        raise
    return flt


def _add_rule(lib: ctypes.CDLL, ctx: int, rule: dict, default: int, warn: Warn) -> None:
    act = action(rule.get("action", ""), rule.get("errnoRet"))
    if act == default:
        return  # libseccomp refuses rules that change nothing
    args = rule.get("args") or []
    conds = []
    for a in args:
        op = OPS.get(a.get("op", ""))
        if op is None:
            raise InvalidSpec("seccomp", f"seccomp: unknown operator {a.get('op')!r}")
        conds.append(
            _ArgCmp(int(a["index"]), op, int(a.get("value", 0)), int(a.get("valueTwo", 0)))
        )
    # libseccomp cannot AND two conditions on the same argument: such rules become one rule
    # per condition (an OR), as runc does.
    indexes = [c.arg for c in conds]
    groups = [[c] for c in conds] if len(set(indexes)) != len(indexes) else [conds]
    for name in rule.get("names") or []:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr == _NR_SCMP_ERROR:
            continue  # a syscall this architecture does not have: nothing to filter
        for group in groups:
            arr = (_ArgCmp * len(group))(*group) if group else None
            rc = lib.seccomp_rule_add_array(ctx, act, nr, len(group), arr)
            _check(rc, f"add rule for {name}")
