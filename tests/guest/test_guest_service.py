"""GuestService through a real ttRPC server on a unix socket: handler wiring, response
shapes and the status codes the host sees."""

from __future__ import annotations

import contextlib
import os
import stat
from types import SimpleNamespace

import pytest
from google.protobuf import empty_pb2
from guest_harness import fake_agent
from prometheus_client.parser import text_string_to_metric_families

import kagent
from kagent.protocols import agent_pb2, csi_pb2
from kagent.service import build_routes
from kagent.service.guest import GuestService
from kagent.service.health import HealthService
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.server import Server
from kagent.ttrpc.status import RpcError

SVC = "grpc.AgentService"
_METHODS = {
    "GetGuestDetails": agent_pb2.GuestDetailsResponse,
    "GetVolumeStats": csi_pb2.VolumeStatsResponse,
    "GetDiagnosticData": agent_pb2.GetDiagnosticDataResponse,
    "GetMetrics": agent_pb2.Metrics,
}


@contextlib.asynccontextmanager
async def served(tmp_sock_dir, agent, **kw):
    server = Server(build_routes([HealthService(), GuestService(agent, **kw)]))
    addr = "unix://" + os.path.join(tmp_sock_dir, "guest.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as client:
            async def call(method, request):
                return await client.call(SVC, method, request, _METHODS.get(method, empty_pb2.Empty), timeout=10)
            yield call
    finally:
        await server.close()


async def expect(code, call, method, request, match=""):
    with pytest.raises(RpcError) as exc:
        await call(method, request)
    assert exc.value.code == code, exc.value
    assert match in exc.value.message
    return exc.value


@pytest.fixture
def shared(tmp_path):
    return tmp_path / "shared" / "containers"


async def test_guest_details(tmp_sock_dir, fake_root):
    agent = fake_agent(storage_handlers=["virtio-fs", "ephemeral", "local"])
    async with served(tmp_sock_dir, agent, root=str(fake_root)) as call:
        resp = await call("GetGuestDetails", agent_pb2.GuestDetailsRequest(mem_block_size=True,
                                                                           mem_hotplug_probe=True))
    assert resp.mem_block_size_bytes == 0x8000000 and resp.support_mem_hotplug_probe
    d = resp.agent_details
    assert d.version == kagent.__version__ and not d.init_daemon and list(d.device_handlers) == []
    assert list(d.storage_handlers) == ["virtio-fs", "ephemeral", "local"]
    assert d.supports_seccomp and list(d.extra_features) == ["agent-policy", "seccomp"]


async def test_copy_file_chunks_and_refusals(tmp_sock_dir, shared, tmp_path):
    async with served(tmp_sock_dir, fake_agent(), shared_dir=str(shared)) as call:
        path = f"{shared}/ctr/rootfs/etc/motd"
        for offset, chunk in ((0, b"hello "), (6, b"world")):
            await call("CopyFile", agent_pb2.CopyFileRequest(path=path, file_size=11, file_mode=0o644,
                                                             dir_mode=0o755, offset=offset, data=chunk,
                                                             uid=os.getuid(), gid=os.getgid()))
        await call("CopyFile", agent_pb2.CopyFileRequest(path=f"{shared}/ctr/link", file_mode=stat.S_IFLNK | 0o777,
                                                         data=b"rootfs/etc/motd", uid=os.getuid(), gid=os.getgid()))
        await expect(Code.PERMISSION_DENIED, call, "CopyFile",
                     agent_pb2.CopyFileRequest(path=f"{shared}/../escape", data=b"x", file_size=1), "'..'")
        await expect(Code.PERMISSION_DENIED, call, "CopyFile",
                     agent_pb2.CopyFileRequest(path=f"{shared}/ctr/link/x", data=b"x", file_size=1), "symlink")
        await expect(Code.INVALID_ARGUMENT, call, "CopyFile",
                     agent_pb2.CopyFileRequest(path="etc/passwd", data=b"x", file_size=1), "not absolute")
    assert (shared / "ctr/rootfs/etc/motd").read_bytes() == b"hello world"
    assert (shared / "ctr/link").read_bytes() == b"hello world"
    assert not (tmp_path / "shared/escape").exists()


async def test_volume_stats(tmp_sock_dir, tmp_path):
    async with served(tmp_sock_dir, fake_agent()) as call:
        resp = await call("GetVolumeStats", agent_pb2.VolumeStatsRequest(volume_guest_path=str(tmp_path)))
        await expect(Code.NOT_FOUND, call, "GetVolumeStats",
                     agent_pb2.VolumeStatsRequest(volume_guest_path=str(tmp_path / "gone")))
    units = [u.unit for u in resp.usage]
    assert units == [csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES]
    assert resp.usage[0].total == os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    assert (resp.volume_condition.abnormal, resp.volume_condition.message) == (False, "OK")


async def test_diagnostic_data(tmp_sock_dir, tmp_path):
    log = tmp_path / "termination-log"
    log.write_text("OOMKilled: it ate everything")
    spec = {"annotations": {"io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
            "mounts": [{"destination": "/dev/termination-log", "source": str(log)}]}
    agent = fake_agent(sandbox=SimpleNamespace(containers={"c1": SimpleNamespace(spec=spec)}))
    async with served(tmp_sock_dir, agent) as call:
        resp = await call("GetDiagnosticData", agent_pb2.GetDiagnosticDataRequest(log_type="termination_log",
                                                                                 container_id="c1"))
        await expect(Code.INVALID_ARGUMENT, call, "GetDiagnosticData",
                     agent_pb2.GetDiagnosticDataRequest(log_type="dmesg", container_id="c1"))
        await expect(Code.NOT_FOUND, call, "GetDiagnosticData",
                     agent_pb2.GetDiagnosticDataRequest(log_type="termination_log", container_id="c9"))
    assert resp.data == "OOMKilled: it ate everything"


async def test_metrics_scrapes_count(tmp_sock_dir):
    async with served(tmp_sock_dir, fake_agent()) as call:
        texts = [(await call("GetMetrics", agent_pb2.GetMetricsRequest())).metrics for _ in range(2)]
    counts = [next(f for f in text_string_to_metric_families(t) if f.name == "kata_agent_scrape_count")
              .samples[0].value for t in texts]
    assert counts == [1, 2]
    assert "kata_guest_meminfo" in {f.name for f in text_string_to_metric_families(texts[1])}


async def test_unimplemented_with_reasons(tmp_sock_dir):
    async with served(tmp_sock_dir, fake_agent()) as call:
        for method, req in (("MemAgentMemcgSet", agent_pb2.MemAgentMemcgConfig(swap=True)),
                            ("MemAgentCompactSet", agent_pb2.MemAgentCompactConfig(period_secs=5))):
            await expect(Code.UNIMPLEMENTED, call, method, req, "mem-agent is not supported")
        await expect(Code.UNIMPLEMENTED, call, "AddSwap", agent_pb2.AddSwapRequest(PCIPath=[2]), "device layer")


async def test_add_swap_with_a_device_layer(tmp_sock_dir, tmp_path):
    """A stand-in device layer answers the PCI path with a file that is no swap area:
    the request is refused before swapon(2), which never runs on the host."""
    not_swap = tmp_path / "vdb"
    not_swap.write_bytes(b"\0" * 8192)
    asked = []

    async def wait_for_pci_block(pci_path):
        asked.append(pci_path)
        return str(not_swap)

    async with served(tmp_sock_dir, fake_agent(wait_for_pci_block=wait_for_pci_block)) as call:
        await expect(Code.INVALID_ARGUMENT, call, "AddSwap", agent_pb2.AddSwapRequest(PCIPath=[2, 3]),
                     "not a swap area")
        await expect(Code.NOT_FOUND, call, "AddSwapPath", agent_pb2.AddSwapPathRequest(path=str(tmp_path / "no")))
    assert asked == ["02/03"]


async def test_validation_errors_reach_the_host(tmp_sock_dir, tmp_path, fake_root):
    dev = tmp_path / "random"
    dev.write_bytes(b"")
    async with served(tmp_sock_dir, fake_agent(), root=str(fake_root), random_device=str(dev)) as call:
        await expect(Code.INVALID_ARGUMENT, call, "ReseedRandomDev", agent_pb2.ReseedRandomDevRequest())
        await expect(Code.INVALID_ARGUMENT, call, "SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest())
        await expect(Code.INVALID_ARGUMENT, call, "SetGuestDateTime",
                     agent_pb2.SetGuestDateTimeRequest(Sec=1_700_000_000, Usec=2_000_000))
        await expect(Code.INVALID_ARGUMENT, call, "UpdateEphemeralMounts", agent_pb2.UpdateEphemeralMountsRequest(
            storages=[agent_pb2.Storage(driver="blk", mount_point=str(tmp_path / "m"))]))
        await expect(Code.NOT_FOUND, call, "ResizeVolume",
                     agent_pb2.ResizeVolumeRequest(volume_guest_path=str(tmp_path / "gone")))
        await call("MemHotplugByProbe", agent_pb2.MemHotplugByProbeRequest(memHotplugProbeAddr=[0x40000000]))
        await call("RemoveStaleVirtiofsShareMounts", agent_pb2.RemoveStaleVirtiofsShareMountsRequest())
        await call("UpdateEphemeralMounts", agent_pb2.UpdateEphemeralMountsRequest(
            storages=[agent_pb2.Storage(driver="ephemeral", mount_point=str(tmp_path / "eph"))]))
    assert (fake_root / "sys/devices/system/memory/probe").read_text() == "0x40000000"
    assert (tmp_path / "eph").is_dir()
    assert dev.read_bytes() == b""
