"""PCI addresses and paths, and their resolution through bridges in a fake sysfs."""

from __future__ import annotations

import pytest
from fake_sysfs import FakeSysfs

from kagent.devices import pci
from kagent.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def fake(tmp_path) -> FakeSysfs:
    return FakeSysfs(str(tmp_path))


@pytest.mark.parametrize("text, slot, function", [
    ("00", 0, 0), ("00.0", 0, 0), ("1f.7", 0x1F, 7), ("0a.5", 0xA, 5), ("A", 0xA, 0), ("3", 3, 0),
])
def test_slotfn_parse(text, slot, function) -> None:
    assert pci.SlotFn.parse(text) == pci.SlotFn(slot, function)


@pytest.mark.parametrize("text", [
    "", "20", "20.0", "00.8", "xy", "00.x", "00.0.0", "00.", ".0", "0x1", "+1", " 1", "1_0", "00.0/",
])
def test_slotfn_rejects(text) -> None:
    with pytest.raises(InvalidArgument):
        pci.SlotFn.parse(text)


def test_address_roundtrip() -> None:
    a = pci.Address.parse("0000:01:02.3")
    assert (a.domain, a.bus, a.slotfn) == (0, 1, pci.SlotFn(2, 3))
    assert str(a) == "0000:01:02.3" and a.bus_name == "0000:01"
    assert str(pci.Address.parse("ffff:ff:1f.7")) == "ffff:ff:1f.7"


@pytest.mark.parametrize("text", [
    "10000:00:00.0", "0000:100:00.0", "0000:00:20.0", "0000:00:00.8", "xyz", "0000:00:00.0:00",
    "0000:00", "",
])
def test_address_rejects(text) -> None:
    with pytest.raises(InvalidArgument):
        pci.Address.parse(text)


@pytest.mark.parametrize("text, expected", [
    ("03", "03.0"), ("03.0/04.0", "03.0/04.0"), ("03/04/05", "03.0/04.0/05.0"),
    ("0a.5/0b.6/0c.7", "0a.5/0b.6/0c.7"),
])
def test_path_parse(text, expected) -> None:
    assert pci.format_path(pci.parse_path(text)) == expected


@pytest.mark.parametrize("text", ["", "20", "00.8", "//", "xyz", "02/", "/02"])
def test_path_rejects(text) -> None:
    with pytest.raises(InvalidArgument):
        pci.parse_path(text)


@pytest.mark.parametrize("text, root, path", [
    ("02/01", "00", "02.0/01.0"),  # legacy bus/device
    ("02/00/01", "00", "02.0/00.0/01.0"),  # nested hot-plug on pci0000:00 (OVMF q35)
    ("20/00/02", "20", "00.0/02.0"),  # pxb-pcie NUMA root complex
    ("3f/01/02/03", "3f", "01.0/02.0/03.0"),
    ("1f/00/02", "00", "1f.0/00.0/02.0"),  # below 0x20: an ordinary slot
    ("20/02", "00", None),  # two elements are never a root complex: and 20 is no slot
])
def test_device_path_root_complex(text, root, path) -> None:
    if path is None:
        with pytest.raises(InvalidArgument):
            pci.parse_device_path(text)
        return
    rc, p = pci.parse_device_path(text)
    assert (rc, pci.format_path(p)) == (root, path)


def test_resolve_through_bridges(fake) -> None:
    root = "/devices/pci0000:00"
    fake.pci_bridge(f"{root}/0000:00:02.0", "0000:01")
    fake.pci_bridge(f"{root}/0000:00:02.0/0000:01:03.0", "0000:05")
    dev = pci.resolve("02/03/01", fake.sys, machine="x86_64")
    assert dev.devpath == f"{root}/0000:00:02.0/0000:01:03.0/0000:05:01.0"
    assert str(dev.address) == "0000:05:01.0"
    assert not dev.exists()  # the final device need not be there yet
    fake.pci_device(dev.devpath)
    assert dev.exists() and dev.sysfs_path == fake.sys + dev.devpath


def test_resolve_single_element_needs_no_bridge(fake) -> None:
    dev = pci.resolve("05", fake.sys, machine="x86_64")
    assert dev.devpath == "/devices/pci0000:00/0000:00:05.0"


def test_resolve_bridge_without_pci_bus_uses_children(fake) -> None:
    root = "/devices/pci0000:00"
    fake.pci_device(f"{root}/0000:00:02.0")
    fake.mkdir(f"{root}/0000:00:02.0/0000:03:00.0")
    fake.mkdir(f"{root}/0000:00:02.0/power")  # not a PCI device: ignored
    assert pci.resolve("02/01", fake.sys, machine="x86_64").devpath == \
        f"{root}/0000:00:02.0/0000:03:01.0"
    fake.mkdir(f"{root}/0000:00:02.0/0000:04:00.0")
    with pytest.raises(FailedPrecondition, match="2 buses"):
        pci.resolve("02/01", fake.sys, machine="x86_64")


def test_resolve_errors(fake) -> None:
    with pytest.raises(NotFound, match="PCI bridge 0000:00:02.0 not found"):
        pci.resolve("02/01", fake.sys, machine="x86_64")
    root = "/devices/pci0000:00"
    fake.pci_bridge(f"{root}/0000:00:02.0", "0000:01")
    fake.mkdir(f"{root}/0000:00:02.0/pci_bus/0000:02")
    with pytest.raises(FailedPrecondition, match="exactly one PCI bus"):
        pci.resolve("02/01", fake.sys, machine="x86_64")


def test_resolve_pxb_root_complex(fake) -> None:
    root = "/devices/pci0000:20"
    fake.pci_bridge(f"{root}/0000:20:00.0", "0000:21")
    dev = pci.resolve("20/00/02", fake.sys, machine="x86_64")
    assert dev.root_complex == "20"
    assert dev.devpath == f"{root}/0000:20:00.0/0000:21:02.0"


def test_root_bus_on_arm64(fake) -> None:
    assert pci.root_bus_path("00", fake.sys, machine="aarch64") == \
        "/devices/platform/4010000000.pcie/pci0000:00"  # the default when nothing is found
    fake.mkdir("/devices/platform/30000000.pci/pci0000:00")
    assert pci.root_bus_path("00", fake.sys, machine="aarch64") == \
        "/devices/platform/30000000.pci/pci0000:00"
    fake.mkdir("/devices/pci0000:00")  # ACPI guests
    assert pci.root_bus_path("00", fake.sys, machine="aarch64") == "/devices/pci0000:00"
    assert pci.root_bus_path("00", fake.sys, machine="x86_64") == "/devices/pci0000:00"
