"""The uevent parser: golden vectors, fuzzing and a storm, through both twins."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uevent_vectors import as_json, load_expected, load_vectors

from kagent import _fast
from kagent.devices import uevent
from kagent.devices.uevent_defs import MAX_MESSAGE_SIZE, Uevent

NO_EXTENSIONS = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"
needs_compiled = pytest.mark.skipif(NO_EXTENSIONS, reason="KAGENT_NO_EXTENSIONS=1")

VECTORS = load_vectors()
EXPECTED = load_expected()


def _compiled_parse():
    mod = _fast.load("uevent")
    if mod is None:
        pytest.fail(f"compiled uevent did not load: {_fast.failures().get('uevent')}")
    return mod.parse


@pytest.fixture(scope="module", params=["pure", pytest.param("compiled", marks=needs_compiled)])
def parse(request: pytest.FixtureRequest):
    return uevent.py_parse if request.param == "pure" else _compiled_parse()


def _outcome(fn, data):
    try:
        return ("ok", fn(data))
    except Exception as exc:  # noqa: BLE001 - the comparison is the test
        return ("raised", type(exc).__name__)


# --------------------------------------------------------------------------- the guard


def test_compiled_module_loaded() -> None:
    """The compiled twin must not silently fall back to pure Python."""
    if NO_EXTENSIONS:
        assert uevent.IMPLEMENTATION == "pure"
        return
    mod = _fast.load("uevent")
    assert mod is not None, f"compiled uevent did not load: {_fast.failures().get('uevent')}"
    assert uevent.parse is mod.parse
    assert uevent.IMPLEMENTATION == "compiled"


# --------------------------------------------------------------------------- golden vectors


def test_fixture_is_complete() -> None:
    assert {v.name for v in VECTORS} == set(EXPECTED)
    origins = {v.origin for v in VECTORS}
    assert origins == {"captured", "constructed"}
    assert sum(v.origin == "captured" for v in VECTORS) >= 5


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_golden_vector(parse, vector) -> None:
    got = parse(vector.data)
    assert as_json(got) == EXPECTED[vector.name]
    if got is not None:
        assert type(got) is Uevent
        # The same through the other buffer types the listener may hand over.
        assert parse(bytearray(vector.data)) == got
        assert parse(memoryview(b"xx" + vector.data)[2:]) == got


def test_key_vectors_spelled_out(parse) -> None:
    """A few expectations written independently of the expected-results file."""
    by_name = {v.name: v.data for v in VECTORS}
    vda = parse(by_name["virtio-blk-pci-disk"])
    assert (vda.action, vda.subsystem, vda.devname) == ("add", "block", "vda")
    assert (vda.get("MAJOR"), vda.get("MINOR"), vda.get("DEVTYPE")) == ("254", "0", "disk")
    assert vda.devpath == "/devices/pci0000:00/0000:00:02.0/0000:01:01.0/virtio4/block/vda"
    lo = parse(by_name["lo-synthetic-add"])
    assert (lo.interface, lo.seqnum, lo.get("SYNTH_UUID")) == ("lo", 1526, "0")
    loop = parse(by_name["loop-attach-change"])
    assert (loop.action, loop.devname, loop.get("DISKSEQ")) == ("change", "loop0", "11")
    assert parse(by_name["no-seqnum-no-trailing-nul"]).seqnum is None
    assert parse(by_name["non-utf8-value"]).get("PARTNAME").encode("utf-8", "surrogateescape") == b"caf\xe9\xff"
    assert parse(by_name["libudev-message"]) is None


@pytest.mark.parametrize("data", [
    b"", b"\0", b"@", b"add@/x", b"libudev\0", b"libudev",
    b"add@/x\0ACTION=add\0DEVPATH=/x\0" + b"P=" + b"v" * MAX_MESSAGE_SIZE + b"\0",
], ids=["empty", "nul", "at", "header-only", "libudev-magic", "libudev-no-nul", "oversized"])
def test_rejected(parse, data) -> None:
    assert parse(data) is None


def test_size_limit_is_inclusive(parse) -> None:
    head = b"add@/x\0ACTION=add\0DEVPATH=/x\0P="
    exact = head + b"v" * (MAX_MESSAGE_SIZE - len(head))
    assert len(exact) == MAX_MESSAGE_SIZE
    assert parse(exact).get("P") == "v" * (MAX_MESSAGE_SIZE - len(head))
    assert parse(exact + b"v") is None


def test_not_a_buffer_is_a_type_error(parse) -> None:
    for bad in (None, "add@/x", 5):
        with pytest.raises(TypeError):
            parse(bad)


# --------------------------------------------------------------------------- fuzz-ish

_field = st.one_of(
    st.sampled_from([b"ACTION=add", b"ACTION=remove", b"ACTION=", b"DEVPATH=/devices/x",
                     b"DEVPATH=x", b"DEVPATH=", b"SUBSYSTEM=block", b"DEVNAME=vda",
                     b"SEQNUM=12", b"SEQNUM=", b"SEQNUM=1x", b"SEQNUM=" + b"9" * 21,
                     b"INTERFACE=eth0", b"=", b"=v", b"K", b"", b"A=B=C", b"X=\xff\xfe",
                     b"\xe2\x82=\xac", b"K=\xf0\x9f\x98"]),
    st.binary(max_size=24),
)
_messages = st.builds(
    lambda head, fields, tail: head + b"\0".join(fields) + tail,
    st.sampled_from([b"add@/devices/x\0", b"change@/x\0", b"@\0", b"noheader\0", b"",
                     b"libudev\0", b"libude"]),
    st.lists(_field, max_size=12),
    st.sampled_from([b"\0", b"", b"\0\0"]),
)


@given(st.binary(max_size=512) | _messages)
@settings(max_examples=600, deadline=None)
def test_random_bytes_never_raise(data: bytes) -> None:
    result = uevent.py_parse(data)
    assert result is None or isinstance(result, Uevent)
    if not NO_EXTENSIONS:
        compiled = _compiled_parse()
        assert _outcome(compiled, data) == ("ok", result)


@needs_compiled
@given(st.integers(MAX_MESSAGE_SIZE - 48, MAX_MESSAGE_SIZE + 8), st.binary(max_size=16))
@settings(max_examples=60, deadline=None)
def test_twins_agree_near_the_size_limit(size: int, tail: bytes) -> None:
    head = b"add@/x\0ACTION=add\0DEVPATH=/x\0P="
    data = (head + b"v" * size)[:size - len(tail)] + tail
    assert _outcome(_compiled_parse(), data) == _outcome(uevent.py_parse, data)


# --------------------------------------------------------------------------- a storm


def synthetic_storm(count: int) -> list[bytes]:
    """``count`` distinct, realistic uevents: disks, partitions, NIC queues, memory blocks."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            path = f"/devices/pci0000:00/0000:00:02.0/0000:01:{i % 32:02x}.0/virtio{i}/block/vd{i}"
            extra = f"MAJOR=254\0MINOR={i}\0DEVNAME=vd{i}\0DEVTYPE=disk\0DISKSEQ={i}\0"
            sub = "block"
        elif kind == 1:
            path = f"/devices/virtual/net/eth{i}/queues/rx-{i % 8}"
            extra, sub = "", "queues"
        elif kind == 2:
            path = f"/devices/system/memory/memory{i}"
            extra, sub = "", "memory"
        else:
            path = f"/devices/pci0000:00/0000:00:03.0/virtio{i}/net/eth{i}"
            extra, sub = f"INTERFACE=eth{i}\0IFINDEX={i}\0", "net"
        msg = f"add@{path}\0ACTION=add\0DEVPATH={path}\0SUBSYSTEM={sub}\0{extra}SEQNUM={i + 1}\0"
        out.append(msg.encode())
    return out


def test_storm_of_10000(capsys) -> None:
    storm = synthetic_storm(10_000)
    twins = {"pure": uevent.py_parse}
    if not NO_EXTENSIONS:
        twins["compiled"] = _compiled_parse()
    seconds = {}
    results = {}
    for name, fn in twins.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            parsed = [fn(m) for m in storm]
            best = min(best, time.perf_counter() - start)
        seconds[name], results[name] = best, parsed
        assert all(u is not None for u in parsed)
        assert [u.seqnum for u in parsed] == list(range(1, 10_001))
    if "compiled" in results:
        assert results["compiled"] == results["pure"]
    with capsys.disabled():
        line = ", ".join(f"{k} {10_000 / v:,.0f} events/s" for k, v in seconds.items())
        if "compiled" in seconds:
            line += f"; compiled/pure x{seconds['pure'] / seconds['compiled']:.1f}"
        print(f"\n[uevent storm] 10000 events: {line}")
