"""Device handlers against a fake sysfs/dev tree, with synthetic uevents injected into the
registry (a hot-plugged virtio disk, SCSI host, NVDIMM or VFIO group cannot exist on these
machines; the listener itself is tested for real in test_uevent_listener.py)."""

from __future__ import annotations

import asyncio
import os
import stat
from types import SimpleNamespace

import pytest
from fake_sysfs import FakeSysfs
from uevent_vectors import make_uevent as ev

from kagent.devices import handlers
from kagent.devices.handlers import update_spec_devices
from kagent.devices.registry import DeviceRegistry
from kagent.devices.spec import DeviceUpdate, apply_updates
from kagent.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unimplemented

ROOT = "/devices/pci0000:00"
BRIDGE = f"{ROOT}/0000:00:02.0"
DISK = f"{BRIDGE}/0000:01:01.0"  # PCI path 02/01
NIC = f"{BRIDGE}/0000:01:02.0"  # PCI path 02/02


@pytest.fixture
def fake(tmp_path) -> FakeSysfs:
    f = FakeSysfs(str(tmp_path))
    f.pci_bridge(BRIDGE, "0000:01")
    return f


@pytest.fixture
def reg(fake) -> DeviceRegistry:
    return DeviceRegistry(sysfs_root=fake.sys, hotplug_timeout=2)


def later(reg: DeviceRegistry, *events, delay: float = 0.02) -> None:
    """Inject events shortly after the handler has started waiting (as the listener would)."""
    loop = asyncio.get_running_loop()
    for i, uev in enumerate(events):
        loop.call_later(delay * (i + 1), reg.handle, uev)


def blk_event(devpath: str, name: str, **extra: str):
    return ev("add", devpath, SUBSYSTEM="block", DEVNAME=name, DEVTYPE="disk", **extra)


def mknod(path: str, kind: int, major: int, minor: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, kind | 0o600, os.makedev(major, minor))
    return path


# --- virtio-blk on PCI --------------------------------------------------------------------------


async def test_blk_pci_present_before_the_agent(fake, reg) -> None:
    fake.pci_device(DISK)
    fake.block(f"{DISK}/virtio4/block/vda")
    node = await handlers.virtio_blk_pci(reg, "02/01", dev_root=fake.dev, timeout=0.01)
    assert node == os.path.join(fake.dev, "vda")


async def test_blk_pci_hot_plugged(fake, reg) -> None:
    later(reg,
          blk_event(f"{NIC}/virtio5/block/vdc", "vdc"),  # another slot
          blk_event(f"{DISK}/virtio4/block/vdb/vdb1", "vdb1"),  # a partition, not the disk
          ev("add", DISK, SUBSYSTEM="pci"),
          blk_event(f"{DISK}/virtio4/block/vdb", "vdb"))
    node = await handlers.virtio_blk_pci(reg, "02/01", dev_root=fake.dev)
    assert node == os.path.join(fake.dev, "vdb")


async def test_blk_pci_seen_earlier_is_found(fake, reg) -> None:
    reg.handle(blk_event(f"{DISK}/virtio4/block/vdb", "vdb"))
    assert await handlers.virtio_blk_pci(reg, "02/01", dev_root=fake.dev, timeout=0.01) == \
        os.path.join(fake.dev, "vdb")


async def test_blk_pci_timeout_names_the_device(fake, reg) -> None:
    with pytest.raises(DeadlineExceeded) as info:
        await handlers.virtio_blk_pci(reg, "02/01", dev_root=fake.dev, timeout=0.1)
    assert str(info.value) == "timeout after 100ms waiting for block device at PCI path 02/01"
    reg.hotplug_timeout = 0.05  # the registry's (configured) timeout is the default
    with pytest.raises(DeadlineExceeded, match="^timeout after 50ms waiting for block device"):
        await handlers.virtio_blk_pci(reg, "02/01", dev_root=fake.dev)


async def test_blk_pci_bad_path(reg) -> None:
    with pytest.raises(InvalidArgument):
        await handlers.virtio_blk_pci(reg, "02/zz")


# --- virtio-blk on MMIO, NVDIMM -------------------------------------------------------------------


async def test_mmio_node_present(fake, reg) -> None:
    open(os.path.join(fake.dev, "vdb"), "w").close()
    assert await handlers.virtio_blk_mmio(reg, "/dev/vdb", dev_root=fake.dev, timeout=0.01) == \
        os.path.join(fake.dev, "vdb")


async def test_mmio_waits_for_the_named_disk(fake, reg) -> None:
    later(reg, blk_event("/devices/virtio-mmio-cmdline/virtio-mmio.0/virtio0/block/vda", "vda"),
          blk_event("/devices/virtio-mmio-cmdline/virtio-mmio.1/virtio1/block/vdb", "vdb"))
    assert await handlers.virtio_blk_mmio(reg, "/dev/vdb", dev_root=fake.dev) == \
        os.path.join(fake.dev, "vdb")


async def test_mmio_devname_mismatch(fake, reg) -> None:
    reg.handle(blk_event("/devices/virtio-mmio-cmdline/virtio-mmio.1/virtio1/block/vdb", "vdz"))
    with pytest.raises(FailedPrecondition, match="unexpected device name vdz"):
        await handlers.virtio_blk_mmio(reg, "/dev/vdb", dev_root=fake.dev, timeout=0.01)


@pytest.mark.parametrize("vm_path", ["", "vdb", "/dev/", "/dev/../etc", "/dev/a/b", "/tmp/vdb"])
async def test_mmio_bad_vm_path(reg, vm_path) -> None:
    with pytest.raises(InvalidArgument):
        await handlers.virtio_blk_mmio(reg, vm_path)


async def test_nvdimm(fake, reg) -> None:
    pmem = "/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0/region0/namespace0.0/block/pmem0"
    later(reg, blk_event("/devices/virtual/block/pmem0", "pmem0"),  # not on the ACPI bus
          blk_event(pmem, "pmem0"))
    assert await handlers.nvdimm(reg, "/dev/pmem0", dev_root=fake.dev) == \
        os.path.join(fake.dev, "pmem0")
    open(os.path.join(fake.dev, "pmem1"), "w").close()
    assert await handlers.nvdimm(reg, "/dev/pmem1", dev_root=fake.dev, timeout=0.01) == \
        os.path.join(fake.dev, "pmem1")
    with pytest.raises(DeadlineExceeded, match="waiting for pmem device /dev/pmem2"):
        await handlers.nvdimm(reg, "/dev/pmem2", dev_root=fake.dev, timeout=0.05)


# --- SCSI -----------------------------------------------------------------------------------------

SCSI_HOST = f"{ROOT}/0000:00:03.0/virtio1/host0"


async def test_scsi_scans_then_waits(fake, reg) -> None:
    scan0, scan1 = fake.scsi_host("host0"), fake.scsi_host("host1")
    later(reg,
          blk_event(f"{SCSI_HOST}/target0:0:1/0:0:1:3/block/sdb", "sdb"),  # another LUN
          ev("add", f"{SCSI_HOST}/target0:0:1/0:0:1:2", SUBSYSTEM="scsi"),  # the scsi_device
          blk_event(f"{SCSI_HOST}/target0:0:1/0:0:1:2/block/sda", "sda"))
    node = await handlers.scsi(reg, "1:2", dev_root=fake.dev)
    assert node == os.path.join(fake.dev, "sda")
    for scan in (scan0, scan1):
        with open(scan) as f:
            assert f.read() == "0 1 2"


async def test_scsi_present_before_the_agent(fake, reg) -> None:
    fake.mkdir("/bus/scsi/devices/0:0:4:0/block/sdc")
    scan = fake.scsi_host()
    assert await handlers.scsi(reg, "4:0", dev_root=fake.dev, timeout=0.01) == \
        os.path.join(fake.dev, "sdc")
    assert fake.read(scan[len(fake.sys):]) == ""  # no scan needed


async def test_scsi_errors(fake, reg) -> None:
    for bad in ("1", "1:2:3", "a:b", "-1:0", "1:", " 1:2"):
        with pytest.raises(InvalidArgument):
            await handlers.scsi(reg, bad)
    with pytest.raises(FailedPrecondition, match="no SCSI host"):
        await handlers.scsi(reg, "1:2", timeout=0.01)
    fake.scsi_host()
    with pytest.raises(DeadlineExceeded, match="waiting for SCSI device 1:2$"):
        await handlers.scsi(reg, "1:2", timeout=0.05)


# --- VFIO -----------------------------------------------------------------------------------------


def vfio_device(fake: FakeSysfs, devpath: str, group: int | None, driver: str | None) -> None:
    fake.pci_device(devpath)
    if group is not None:
        fake.iommu_group(devpath, group)
    if driver is not None:
        fake.bind_driver(devpath, driver)


async def test_vfio_pci_binds_and_finds_the_group(fake, reg) -> None:
    vfio_device(fake, DISK, 5, "virtio-pci")
    later(reg, ev("add", "/devices/virtual/vfio/5", SUBSYSTEM="vfio", DEVNAME="vfio/5"))
    res = await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01"], dev_root=fake.dev)
    assert res.node_path == os.path.join(fake.dev, "vfio/5")
    assert [(str(h), str(g)) for h, g in res.pci_map] == [("0000:3b:00.0", "0000:01:01.0")]
    assert fake.read(f"{DISK}/driver_override") == "vfio-pci"
    assert fake.read("/bus/pci/drivers/virtio-pci/unbind") == "0000:01:01.0"
    assert fake.read("/bus/pci/drivers_probe") == "0000:01:01.0"


async def test_vfio_pci_hot_plugged_device_and_existing_group(fake, reg) -> None:
    fake.mkdir("/devices/virtual/vfio/7")

    def plug() -> None:  # the device appears in sysfs, then its uevent is sent
        vfio_device(fake, DISK, 7, None)
        reg.handle(ev("add", DISK, SUBSYSTEM="pci"))

    asyncio.get_running_loop().call_later(0.02, plug)
    res = await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01", "0000:3b:00.1="], dev_root=fake.dev)
    assert res.node_path == os.path.join(fake.dev, "vfio/7")
    assert len(res.pci_map) == 1  # the empty guest path is skipped
    assert fake.read("/bus/pci/drivers_probe") == "0000:01:01.0"  # no driver: no unbind


async def test_vfio_pci_already_on_vfio_pci(fake, reg) -> None:
    vfio_device(fake, DISK, 5, "vfio-pci")
    fake.mkdir("/devices/virtual/vfio/5")
    await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01"], dev_root=fake.dev)
    assert fake.read("/bus/pci/drivers/vfio-pci/unbind") == ""
    assert fake.read("/bus/pci/drivers_probe") == ""


async def test_vfio_pci_gk_leaves_the_driver(fake, reg) -> None:
    vfio_device(fake, DISK, 5, "virtio-pci")
    res = await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01"], guest_kernel=True)
    assert res.node_path is None and len(res.pci_map) == 1
    assert fake.read(f"{DISK}/driver_override") == "(null)\n"


async def test_vfio_pci_errors(fake, reg) -> None:
    vfio_device(fake, DISK, 5, None)
    vfio_device(fake, NIC, 6, None)
    vfio_device(fake, f"{BRIDGE}/0000:01:03.0", None, None)
    for bad in (["0000:3b:00.0"], ["a=b=c"], ["zz=02/01"], ["0000:3b:00.0=zz"]):
        with pytest.raises(InvalidArgument):
            await handlers.vfio_pci(reg, bad)
    with pytest.raises(InvalidArgument, match="no VFIO PCI device"):
        await handlers.vfio_pci(reg, ["0000:3b:00.0="])
    with pytest.raises(FailedPrecondition, match="not in guest IOMMU group 5"):
        await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01", "0000:3b:00.1=02/02"])
    with pytest.raises(FailedPrecondition, match="0000:01:03.0 has no IOMMU group"):
        await handlers.vfio_pci(reg, ["0000:3b:00.0=02/03"])
    with pytest.raises(DeadlineExceeded, match="waiting for PCI device at PCI path 02/04"):
        await handlers.vfio_pci(reg, ["0000:3b:00.0=02/04"], timeout=0.05)
    with pytest.raises(DeadlineExceeded, match="waiting for VFIO group 5"):
        await handlers.vfio_pci(reg, ["0000:3b:00.0=02/01"], timeout=0.05)


# --- network --------------------------------------------------------------------------------------


async def test_net_pci_present_and_hot_plugged(fake, reg) -> None:
    fake.net_link("eth0", f"{NIC}/virtio5/net/eth0")
    fake.net_link("lo", "/devices/virtual/net/lo")
    assert await handlers.net_pci(reg, "02/02", timeout=0.01) == "eth0"
    later(reg,
          ev("add", f"{NIC}/virtio5/net/eth0/queues/rx-0", SUBSYSTEM="queues"),
          ev("add", f"{DISK}0/virtio6/net/eth9", SUBSYSTEM="net", INTERFACE="eth9"),  # 01.00
          ev("add", f"{DISK}/virtio6/net/eth1", SUBSYSTEM="net", INTERFACE="eth1"))
    assert await handlers.net_pci(reg, "02/01") == "eth1"
    with pytest.raises(DeadlineExceeded, match="waiting for network device at PCI path 02/03"):
        await handlers.net_pci(reg, "02/03", timeout=0.05)


# --- the OCI spec ---------------------------------------------------------------------------------


def spec_with(*devices: dict, rules: list | None = None) -> dict:
    linux: dict = {"devices": list(devices)}
    if rules is not None:
        linux["resources"] = {"devices": rules}
    return {"ociVersion": "1.0.2", "linux": linux}


def test_update_spec_devices_char() -> None:
    spec = spec_with({"path": "/dev/mine", "type": "c", "major": 99, "minor": 98},
                     rules=[{"allow": False, "access": "rwm"},
                            {"allow": True, "type": "c", "major": 99, "minor": 98, "access": "rw"}])
    upd = update_spec_devices(spec, "/dev/mine", "/dev/null")
    assert upd == DeviceUpdate("/dev/mine", "c", 1, 3)
    assert spec["linux"]["devices"] == [{"path": "/dev/mine", "type": "c", "major": 1, "minor": 3}]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},  # host rule rewritten
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    ]


def test_update_spec_creates_resources() -> None:
    spec = spec_with({"path": "/dev/x", "type": "c", "major": 5, "minor": 5})
    update_spec_devices(spec, "/dev/x", "/dev/zero")
    assert spec["linux"]["resources"] == {
        "devices": [{"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}]}


def test_update_spec_swapped_numbers_are_patched_once() -> None:
    # Host /dev/a is 1:3 and /dev/b is 1:5; in the guest a is 1:5 and b is 1:7.  Patching
    # one at a time would rewrite a's new rule (1:5) again as b's.
    spec = spec_with({"path": "/dev/a", "type": "c", "major": 1, "minor": 3},
                     {"path": "/dev/b", "type": "c", "major": 1, "minor": 5},
                     rules=[{"allow": True, "type": "c", "major": 1, "minor": 3, "access": "r"},
                            {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "w"}])
    from kagent.devices.spec import device_update
    apply_updates(spec, [device_update("/dev/a", "/dev/zero"), device_update("/dev/b", "/dev/full")])
    assert [(d["major"], d["minor"]) for d in spec["linux"]["devices"]] == [(1, 5), (1, 7)]
    assert [(r["minor"], r["access"]) for r in spec["linux"]["resources"]["devices"]] == \
        [(5, "r"), (7, "w"), (5, "rwm"), (7, "rwm")]


def test_update_spec_errors(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="no linux section"):
        update_spec_devices({}, "/dev/x", "/dev/null")
    with pytest.raises(InvalidArgument, match="missing from the OCI spec: /dev/x"):
        update_spec_devices(spec_with({"path": "/dev/y", "type": "c"}), "/dev/x", "/dev/null")
    with pytest.raises(FailedPrecondition, match="not there"):
        update_spec_devices(spec_with(), "/dev/x", str(tmp_path / "none"))
    with pytest.raises(FailedPrecondition, match="not a device node"):
        update_spec_devices(spec_with(), "/dev/x", str(tmp_path))
    with pytest.raises(InvalidArgument, match="conflicting device updates"):
        apply_updates(spec_with(), [DeviceUpdate("/dev/x", "c", 1, 3)] * 2)


# --- add_devices: Device → handler → spec (real device nodes in the fake /dev: root) ----------------


def device(type_: str, id_: str = "", vm_path: str = "", container_path: str = "/dev/xda",
           options: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(type=type_, id=id_, vm_path=vm_path, container_path=container_path,
                           options=list(options))


@pytest.mark.root
async def test_add_devices_patches_the_spec(fake, reg) -> None:
    fake.pci_device(DISK)
    fake.block(f"{DISK}/virtio4/block/vda")
    mknod(os.path.join(fake.dev, "vda"), stat.S_IFBLK, 254, 0)
    mknod(os.path.join(fake.dev, "vdb"), stat.S_IFBLK, 254, 16)
    vfio_device(fake, NIC, 5, None)
    mknod(os.path.join(fake.dev, "vfio", "5"), stat.S_IFCHR, 243, 0)
    fake.mkdir("/devices/virtual/vfio/5")
    spec = spec_with({"path": "/dev/xda", "type": "b", "major": 8, "minor": 0},
                     {"path": "/dev/xdb", "type": "b", "major": 8, "minor": 16},
                     {"path": "/dev/vfio/42", "type": "c", "major": 240, "minor": 1},
                     rules=[])
    devices = [device("blk", id_="02/01"),
               device("mmioblk", vm_path="/dev/vdb", container_path="/dev/xdb"),
               device("vfio-pci", id_="x", container_path="/dev/vfio/42",
                      options=("0000:3b:00.0=02/02",))]
    pci_map = await handlers.add_devices(reg, devices, spec, dev_root=fake.dev)
    assert [(str(h), str(g)) for h, g in pci_map] == [("0000:3b:00.0", "0000:01:02.0")]
    assert spec["linux"]["devices"] == [
        {"path": "/dev/xda", "type": "b", "major": 254, "minor": 0},
        {"path": "/dev/xdb", "type": "b", "major": 254, "minor": 16},
        {"path": os.path.join(fake.dev, "vfio/5"), "type": "c", "major": 243, "minor": 0},
    ]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": True, "type": t, "major": ma, "minor": mi, "access": "rwm"}
        for t, ma, mi in (("b", 254, 0), ("b", 254, 16), ("c", 243, 0))]


async def test_add_device_validation(reg) -> None:
    for dev, exc, msg in [
        (device(""), InvalidArgument, "invalid type"),
        (device("blk"), InvalidArgument, "invalid ID and VM path"),
        (device("blk", id_="02/01", container_path=""), InvalidArgument, "invalid container path"),
        (device("floppy", id_="1"), InvalidArgument, "no handler for device type 'floppy'"),
        (device("vfio-ap", id_="1"), Unimplemented, "only supported on s390x"),
        (device("blk-ccw", id_="0.0.0001"), Unimplemented, "only supported on s390x"),
    ]:
        with pytest.raises(exc, match=msg):
            await handlers.add_device(reg, dev)
