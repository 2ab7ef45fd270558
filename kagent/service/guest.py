"""grpc.AgentService, the guest-level RPCs: details, clock, entropy, memory, volumes, swap,
shared files, diagnostics, metrics.

Thin handlers: decode, call kagent.guest / kagent.copyfile / kagent.metrics, shape the
response.  Work that can block (mounts, subprocesses, file copies, statfs, scrapes)
runs in a thread so the event loop keeps serving the other calls.
"""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2

from kagent import guest
from kagent.copyfile import CopyRequest, copy_file
from kagent.errors import Unimplemented
from kagent.metrics import AgentMetrics
from kagent.protocols import agent_pb2, csi_pb2

_EMPTY = empty_pb2.Empty


class GuestService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: object, *, root: str = "/", shared_dir: str = guest.SHARED_DIR,
                 random_device: str = guest.RANDOM_DEVICE,
                 mountinfo: str = "/proc/self/mountinfo") -> None:
        # The keyword arguments point the service at a fake tree in tests.
        self.agent = agent
        self.root = root
        self.shared_dir = shared_dir
        self.random_device = random_device
        self.mountinfo = mountinfo
        self.metrics: AgentMetrics = getattr(agent, "metrics", None) or AgentMetrics()

    async def GetGuestDetails(self, request: agent_pb2.GuestDetailsRequest, ctx) -> agent_pb2.GuestDetailsResponse:
        d = guest.guest_details(request.mem_block_size, request.mem_hotplug_probe,
                                storage_handlers=getattr(self.agent, "storage_handlers", []), root=self.root)
        return agent_pb2.GuestDetailsResponse(
            mem_block_size_bytes=d.mem_block_size_bytes,
            support_mem_hotplug_probe=d.support_mem_hotplug_probe,
            agent_details=agent_pb2.AgentDetails(
                version=d.version, init_daemon=d.init_daemon, device_handlers=[],
                storage_handlers=d.storage_handlers, supports_seccomp=d.supports_seccomp,
                extra_features=d.extra_features),
        )

    async def SetGuestDateTime(self, request: agent_pb2.SetGuestDateTimeRequest, ctx) -> empty_pb2.Empty:
        guest.set_guest_datetime(request.Sec, request.Usec)
        return _EMPTY()

    async def ReseedRandomDev(self, request: agent_pb2.ReseedRandomDevRequest, ctx) -> empty_pb2.Empty:
        guest.reseed_random(request.data, self.random_device)
        return _EMPTY()

    async def MemHotplugByProbe(self, request: agent_pb2.MemHotplugByProbeRequest, ctx) -> empty_pb2.Empty:
        # the kernel adds the memory section during the write: off the loop
        await asyncio.to_thread(guest.mem_hotplug_by_probe, list(request.memHotplugProbeAddr), self.root)
        return _EMPTY()

    async def GetVolumeStats(self, request: agent_pb2.VolumeStatsRequest, ctx) -> csi_pb2.VolumeStatsResponse:
        space, inodes = await asyncio.to_thread(guest.volume_stats, request.volume_guest_path)
        unit = csi_pb2.VolumeUsage
        return csi_pb2.VolumeStatsResponse(
            usage=[unit(total=space.total, used=space.used, available=space.available, unit=unit.BYTES),
                   unit(total=inodes.total, used=inodes.used, available=inodes.available, unit=unit.INODES)],
            volume_condition=csi_pb2.VolumeCondition(abnormal=False, message="OK"),
        )

    async def ResizeVolume(self, request: agent_pb2.ResizeVolumeRequest, ctx) -> empty_pb2.Empty:
        await asyncio.to_thread(guest.resize_volume, request.volume_guest_path, mountinfo_path=self.mountinfo)
        return _EMPTY()

    async def AddSwapPath(self, request: agent_pb2.AddSwapPathRequest, ctx) -> empty_pb2.Empty:
        await asyncio.to_thread(guest.swapon, request.path)
        return _EMPTY()

    async def AddSwap(self, request: agent_pb2.AddSwapRequest, ctx) -> empty_pb2.Empty:
        wait = getattr(self.agent, "wait_for_pci_block", None)
        if wait is None:
            raise Unimplemented("AddSwap: waiting for a virtio-blk device by PCI path needs the "
                                "device layer, which this agent does not have")
        device = await wait(guest.pci_path_text(list(request.PCIPath)))
        await asyncio.to_thread(guest.swapon, device)
        return _EMPTY()

    async def RemoveStaleVirtiofsShareMounts(self, request, ctx) -> empty_pb2.Empty:
        await asyncio.to_thread(guest.stat_shared_mounts, self.shared_dir, self.mountinfo)
        return _EMPTY()

    async def GetDiagnosticData(self, request: agent_pb2.GetDiagnosticDataRequest,
                                ctx) -> agent_pb2.GetDiagnosticDataResponse:
        data = guest.diagnostic_data(self.agent, request.log_type, request.container_id)
        return agent_pb2.GetDiagnosticDataResponse(data=data)

    async def MemAgentMemcgSet(self, request: agent_pb2.MemAgentMemcgConfig, ctx) -> empty_pb2.Empty:
        raise Unimplemented("MemAgentMemcgSet: mem-agent is not supported by kagent")

    async def MemAgentCompactSet(self, request: agent_pb2.MemAgentCompactConfig, ctx) -> empty_pb2.Empty:
        raise Unimplemented("MemAgentCompactSet: mem-agent is not supported by kagent")

    async def UpdateEphemeralMounts(self, request: agent_pb2.UpdateEphemeralMountsRequest,
                                    ctx) -> empty_pb2.Empty:
        storages = [guest.EphemeralMount(s.driver, s.source, s.fstype, tuple(s.options), s.mount_point)
                    for s in request.storages]
        await asyncio.to_thread(guest.update_ephemeral_mounts, storages)
        return _EMPTY()

    async def CopyFile(self, request: agent_pb2.CopyFileRequest, ctx) -> empty_pb2.Empty:
        req = CopyRequest(path=request.path, file_size=request.file_size, file_mode=request.file_mode,
                          dir_mode=request.dir_mode, uid=request.uid, gid=request.gid,
                          offset=request.offset, data=request.data)
        await asyncio.to_thread(copy_file, req, self.shared_dir)
        return _EMPTY()

    async def GetMetrics(self, request: agent_pb2.GetMetricsRequest, ctx) -> agent_pb2.Metrics:
        return agent_pb2.Metrics(metrics=await self.metrics.gather())
