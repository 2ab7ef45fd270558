"""Device rules on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program through bpf(2).

cgroup v2 has no devices.allow/deny files; the kernel instead runs the BPF
programs attached to a process's cgroup (and its ancestors) on every device
open and mknod.  ``program(rules)`` assembles one program from the OCI rules;
``apply(cgroup_dir, rules)`` loads it, attaches it with BPF_F_ALLOW_MULTI and
then detaches whatever was attached there before, so an update never leaves
the cgroup unfiltered (for a moment both run, and both must allow).

The program mirrors the v1 exception list: the context is
``struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }``
(access in the high 16 bits, device type in the low); rules are tested last
to first and the first match decides, so a later rule overrides an earlier
one and a leading ``deny a *:* rwm`` is the fallback.  An allow rule must
cover every access bit asked for; a deny rule matches any overlap.  When no
rule matches the access is allowed, as a fresh v1 cgroup inherits allow-all.

The bpf(2) calls are ctypes: they run once per container create/update, far
from any hot path.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Sequence

from .resources import DeviceRule

__all__ = ["program", "apply", "attached", "BPF_NR"]

# bpf(2) syscall numbers per architecture
BPF_NR = {"x86_64": 321, "aarch64": 280, "arm64": 280, "s390x": 351, "ppc64le": 361}.get(platform.machine())

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
_ACCESS = {"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}

_ATTR_SIZE = 128  # larger than every bpf_attr part used here; the kernel checks the tail is zero
_INSN = struct.Struct("<BBhi")

# opcodes (linux/bpf.h, linux/bpf_common.h)
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_MOV32_X = 0xBC
_AND32_K = 0x54
_RSH32_K = 0x74
_MOV64_K = 0xB7
_JNE_K = 0x55
_JEQ_K = 0x15
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> tuple:
    return (code, dst, src, off, imm)


def _mask(access: str) -> int:
    bits = 0
    for c in access:
        bits |= _ACCESS[c]
    return bits


def _block(rule: DeviceRule) -> list[tuple]:
    """Instructions that return rule.allow when the rule matches, else fall through."""
    tests: list[tuple] = []  # (code, dst, imm) conditional jumps to the end of the block
    body: list[tuple] = []
    if rule.type in ("c", "b"):
        tests.append((_JNE_K, 2, DEV_CHAR if rule.type == "c" else DEV_BLOCK))
    want = _mask(rule.access)
    pre = [_insn(_MOV32_X, 6, 3)]
    if rule.allow:
        pre.append(_insn(_AND32_K, 6, imm=~want & 7))  # asked-for bits the rule does not grant
        access_test = (_JNE_K, 6, 0)
    else:
        pre.append(_insn(_AND32_K, 6, imm=want))  # any asked-for bit the rule denies
        access_test = (_JEQ_K, 6, 0)
    if rule.type != "a" and rule.major is not None:
        body.append((_JNE_K, 4, rule.major))
    if rule.type != "a" and rule.minor is not None:
        body.append((_JNE_K, 5, rule.minor))
    seq: list[tuple | str] = [*tests, "pre", access_test, *body]
    out: list[tuple] = []
    jumps: list[int] = []
    for item in seq:
        if item == "pre":
            out.extend(pre)
            continue
        code, dst, imm = item
        jumps.append(len(out))
        out.append(_insn(code, dst, imm=imm))
    out.append(_insn(_MOV64_K, 0, imm=1 if rule.allow else 0))
    out.append(_insn(_EXIT))
    for at in jumps:  # jump past the block's end
        code, dst, src, _, imm = out[at]
        out[at] = (code, dst, src, len(out) - at - 1, imm)
    return out


def program(rules: Sequence[DeviceRule]) -> bytes:
    """The BPF bytecode for ``rules`` (OCI order; the last matching rule wins)."""
    insns = [
        _insn(_LDX_W, 2, 1, 0),  # r2 = access_type
        _insn(_MOV32_X, 3, 2),  # r3 = access_type
        _insn(_AND32_K, 2, imm=0xFFFF),  # r2 = device type
        _insn(_RSH32_K, 3, imm=16),  # r3 = access asked for
        _insn(_LDX_W, 4, 1, 4),  # r4 = major
        _insn(_LDX_W, 5, 1, 8),  # r5 = minor
    ]
    for rule in reversed(rules):
        insns.extend(_block(rule))
    insns.append(_insn(_MOV64_K, 0, imm=1))
    insns.append(_insn(_EXIT))
    return b"".join(_INSN.pack(code, (src << 4) | dst, off, imm) for code, dst, src, off, imm in insns)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    if BPF_NR is None:
        raise OSError(38, f"bpf: no syscall number for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    rc = _libc.syscall(ctypes.c_long(BPF_NR), ctypes.c_long(cmd), buf, ctypes.c_uint(_ATTR_SIZE))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({what}): {os.strerror(err)}")
    return rc


def load(code: bytes) -> int:
    """Load a CGROUP_DEVICE program; the fd, or OSError carrying the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack(
        "<IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8, ctypes.addressof(insns),
        ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, b"kagent_devices", 0,
        BPF_CGROUP_DEVICE,
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr, "PROG_LOAD")
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}{': ' + text[-500:] if text else ''}") from None


def attached(cgroup_fd: int) -> list[int]:
    """The ids of the device programs attached directly to a cgroup."""
    ids = (ctypes.c_uint32 * 64)()
    attr = bytearray(struct.pack("<IIIIQI", cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), 64))
    buf = ctypes.create_string_buffer(bytes(attr).ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    rc = _libc.syscall(ctypes.c_long(BPF_NR or -1), ctypes.c_long(BPF_PROG_QUERY), buf, ctypes.c_uint(_ATTR_SIZE))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(PROG_QUERY): {os.strerror(err)}")
    count = struct.unpack_from("<I", buf.raw, 24)[0]
    return list(ids[: min(count, 64)])


def apply(cgroup_dir: str, rules: Sequence[DeviceRule]) -> None:
    """Replace the device program of a v2 cgroup by one built from ``rules``."""
    cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        old = attached(cgroup_fd)
        prog_fd = load(program(rules))
        try:
            attr = struct.pack("<IIII", cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
            _bpf(BPF_PROG_ATTACH, attr, f"PROG_ATTACH {cgroup_dir}")
        finally:
            os.close(prog_fd)  # the cgroup holds its own reference
        for prog_id in old:
            try:
                old_fd = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id), "PROG_GET_FD_BY_ID")
            except FileNotFoundError:
                continue  # already gone
            try:
                attr = struct.pack("<III", cgroup_fd, old_fd, BPF_CGROUP_DEVICE)
                _bpf(BPF_PROG_DETACH, attr, f"PROG_DETACH {cgroup_dir}")
            finally:
                os.close(old_fd)
    finally:
        os.close(cgroup_fd)
