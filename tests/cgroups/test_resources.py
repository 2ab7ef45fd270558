"""OCI resource helpers, v2 conversions, device rules and the v2 device BPF program.

The BPF program is checked two ways: a small interpreter for the instructions
it uses runs it against a reference of the v1 rule semantics (hypothesis picks
rule lists and accesses), and the kernel's verifier must accept it (root).
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kagent.cgroups import bpfdev
from kagent.cgroups.resources import (
    DEFAULT_DEVICE_RULES,
    DeviceRule,
    allows_all,
    blkio_weight_to_io_weight,
    device_rules,
    hugepage_size,
    num,
    rule,
    shares_to_weight,
    swap_to_v2,
)
from kagent.errors import InvalidArgument


def test_shares_to_weight_as_upstream():
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 1 + (1022 * 9999) // 262142 == 39
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(0) == 0


def test_blkio_weight_to_io_weight():
    assert blkio_weight_to_io_weight(10) == 1
    assert blkio_weight_to_io_weight(1000) == 10000
    assert blkio_weight_to_io_weight(500) == 1 + (490 * 9999) // 990


def test_swap_to_v2():
    assert swap_to_v2(None, 100) is None
    assert swap_to_v2(-1, 100) == -1
    assert swap_to_v2(300, 100) == 200
    assert swap_to_v2(100, 100) == 0
    with pytest.raises(InvalidArgument, match="must be >= memory.limit"):
        swap_to_v2(50, 100)
    with pytest.raises(InvalidArgument, match="needs a memory.limit"):
        swap_to_v2(50, None)


def test_num_treats_zero_as_unset():
    assert num({"a": 0}, "a") is None and num({}, "a") is None and num({"a": -1}, "a") == -1
    with pytest.raises(InvalidArgument, match="integer"):
        num({"a": "5"}, "a")


def test_hugepage_size_accepts_both_spellings():
    assert hugepage_size({"pageSize": "2MB"}) == "2MB"
    assert hugepage_size({"pagesize": "1GB"}) == "1GB"  # what a proto round trip gives
    for bad in ({}, {"pageSize": "../x"}, {"pageSize": "MB"}):
        with pytest.raises(InvalidArgument):
            hugepage_size(bad)


def test_device_rules():
    assert rule({"allow": False, "access": "rwm"}) == DeviceRule(False, "a", None, None, "rwm")
    assert rule({"allow": True, "type": "c", "major": 1, "minor": 3, "access": "wr"}).v1_text() == "c 1:3 rw"
    assert rule({"allow": True, "type": "b", "major": -1, "access": "m"}).v1_text() == "b *:* m"
    assert rule({"type": "c", "major": 136}).v1_text() == "c 136:* rwm"
    assert rule({"type": "a", "major": 5, "minor": 5, "access": "r"}).v1_text() == "a *:* r"
    for bad in ({"type": "x"}, {"access": "rwx"}, {"type": "c", "major": "1"}, {"type": "c", "minor": -5}):
        with pytest.raises(InvalidArgument):
            rule(bad)
    rules = device_rules([{"allow": False, "access": "rwm"}], defaults=True)
    assert rules[0].v1_text() == "a *:* rwm" and rules[1:] == list(DEFAULT_DEVICE_RULES)
    assert device_rules(None, defaults=False) == []


def test_allows_all():
    deny = {"allow": False, "access": "rwm"}
    allow = {"allow": True, "access": "rwm"}
    assert not allows_all(device_rules([deny], defaults=True))
    assert allows_all(device_rules([deny, allow], defaults=True))
    assert not allows_all(device_rules([allow, deny], defaults=False))
    assert not allows_all(device_rules([{"allow": True, "access": "rw"}], defaults=False))


# --- the BPF program --------------------------------------------------------------------------

ACCESS_BITS = {"m": 1, "r": 2, "w": 4}
TYPE_CODE = {"b": 1, "c": 2}


def run_program(code: bytes, dev_type: str, major: int, minor: int, access: str) -> int:
    """Interpret the instructions bpfdev emits, on one bpf_cgroup_dev_ctx."""
    acc = sum(ACCESS_BITS[c] for c in access)
    ctx = [(acc << 16) | TYPE_CODE[dev_type], major, minor]
    regs = [0] * 11
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    pc = 0
    for _ in range(10000):
        op, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0xF, regs_byte >> 4
        pc += 1
        if op == 0x61:
            assert src == 1 and off % 4 == 0
            regs[dst] = ctx[off // 4]
        elif op == 0xBC:
            regs[dst] = regs[src] & 0xFFFFFFFF
        elif op == 0x54:
            regs[dst] = regs[dst] & imm & 0xFFFFFFFF
        elif op == 0x74:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> imm
        elif op == 0xB7:
            regs[dst] = imm
        elif op == 0x55:
            if regs[dst] != imm:
                pc += off
        elif op == 0x15:
            if regs[dst] == imm:
                pc += off
        elif op == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
    raise AssertionError("program did not finish")


def reference(rules: list[DeviceRule], dev_type: str, major: int, minor: int, access: str) -> int:
    """The v1 exception-list meaning: the last matching rule decides; none matching → allow."""
    for r in reversed(rules):
        if r.type != "a" and (r.type != dev_type or (r.major is not None and r.major != major)
                              or (r.minor is not None and r.minor != minor)):
            continue
        if r.allow and set(access) <= set(r.access):
            return 1
        if not r.allow and set(access) & set(r.access):
            return 0
    return 1


def test_program_typical_spec():
    rules = device_rules([{"allow": False, "access": "rwm"},
                          {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"},
                          {"allow": False, "type": "c", "major": 1, "minor": 5, "access": "w"}], defaults=True)
    code = bpfdev.program(rules)
    assert run_program(code, "c", 1, 3, "rw") == 1  # /dev/null (default)
    assert run_program(code, "c", 1, 5, "r") == 1  # /dev/zero read (default allow is later)
    assert run_program(code, "c", 10, 229, "rw") == 1  # /dev/fuse
    assert run_program(code, "c", 10, 229, "m") == 1  # mknod of any char device (default)
    assert run_program(code, "b", 254, 0, "r") == 0  # the disk
    assert run_program(code, "c", 1, 11, "r") == 0  # /dev/kmsg
    no_defaults = bpfdev.program(device_rules([{"allow": False, "access": "rwm"},
                                               {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"}],
                                              defaults=False))
    assert run_program(no_defaults, "c", 1, 5, "r") == 1
    assert run_program(no_defaults, "c", 1, 5, "rw") == 0  # the allow does not cover w
    assert run_program(no_defaults, "c", 1, 3, "r") == 0


rules_st = st.lists(st.builds(
    DeviceRule,
    allow=st.booleans(),
    type=st.sampled_from(["a", "c", "b"]),
    major=st.one_of(st.none(), st.integers(0, 3)),
    minor=st.one_of(st.none(), st.integers(0, 3)),
    access=st.sampled_from(["r", "w", "m", "rw", "rm", "wm", "rwm"]),
), max_size=8)


@settings(max_examples=300, deadline=None)
@given(rules=rules_st, dev_type=st.sampled_from(["c", "b"]), major=st.integers(0, 3), minor=st.integers(0, 3),
       access=st.sampled_from(["r", "w", "m", "rw", "rwm"]))
def test_program_matches_rule_semantics(rules, dev_type, major, minor, access):
    assert run_program(bpfdev.program(rules), dev_type, major, minor, access) == reference(rules, dev_type, major, minor, access)


@pytest.mark.root
@pytest.mark.skipif(bpfdev.BPF_NR is None, reason="no bpf syscall number for this architecture")
def test_kernel_verifier_accepts_programs():
    for rules in ([], list(DEFAULT_DEVICE_RULES),
                  device_rules([{"allow": False, "access": "rwm"}] * 3 + [{"allow": True, "type": "b", "major": 8}],
                               defaults=True)):
        fd = bpfdev.load(bpfdev.program(rules))
        os.close(fd)
    with pytest.raises(OSError, match="PROG_LOAD"):
        bpfdev.load(b"\x95" + b"\0" * 7)  # exit without setting r0: the verifier refuses it, with its log
