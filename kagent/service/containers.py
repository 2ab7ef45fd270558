"""Container and process RPCs: thin handlers over kagent.sandbox.

Stdio semantics (kagent.stdio): ReadStdout/ReadStderr return one read of up to
``len`` bytes and empty data at EOF; WriteStdin with empty data closes stdin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf import empty_pb2
from google.protobuf.json_format import MessageToDict

from kagent import cgroups, oci, tracing
from kagent.devices import handlers
from kagent.errors import FailedPrecondition, InvalidArgument, Unavailable
from kagent.protocols import agent_pb2
from kagent.ttrpc.server import eager

if TYPE_CHECKING:
    from kagent.agent import Agent

EMPTY = empty_pb2.Empty()


class ContainerService:
    SERVICE = "grpc.AgentService"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @property
    def sandbox(self):
        return self.agent.sandbox

    def _pipe_size(self) -> int:
        return self.agent.config.container_pipe_size

    # -- life cycle ------------------------------------------------------------

    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest, ctx):
        if not req.HasField("OCI"):
            raise InvalidArgument("CreateContainer needs an OCI spec")
        spec = oci.spec_to_dict(req.OCI)
        if req.HasField("string_user"):
            spec.setdefault("process", {})["stringUser"] = _string_user(req.string_user)
        if req.devices:
            # Wait for each hot-plugged device; the spec gets the guest's major/minor.
            with tracing.span("device wait", container_id=req.container_id, devices=len(req.devices)):
                await handlers.add_devices(self.agent.devices, req.devices, spec)
        await self.sandbox.create_container(req.container_id, spec, pipe_size=self._pipe_size(),
                                            storages=req.storages, sandbox_pidns=req.sandbox_pidns,
                                            ports=_ports(req))
        return EMPTY

    async def StartContainer(self, req: agent_pb2.StartContainerRequest, ctx):
        await self.sandbox.start_container(req.container_id)
        return EMPTY

    async def RemoveContainer(self, req: agent_pb2.RemoveContainerRequest, ctx):
        await self.sandbox.remove_container(req.container_id, float(req.timeout))
        return EMPTY

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest, ctx):
        if not req.HasField("process"):
            raise InvalidArgument("ExecProcess needs a process")
        process = oci.process_to_dict(req.process)
        if req.HasField("string_user"):
            process["stringUser"] = _string_user(req.string_user)
        await self.sandbox.exec_process(req.container_id, req.exec_id, process, pipe_size=self._pipe_size(),
                                        ports=_ports(req))
        return EMPTY

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest, ctx):
        await self.sandbox.signal_process(req.container_id, req.exec_id, req.signal)
        return EMPTY

    async def WaitProcess(self, req: agent_pb2.WaitProcessRequest, ctx):
        status = await self.sandbox.wait_process(req.container_id, req.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    # -- stdio ------------------------------------------------------------------

    async def _read(self, req: agent_pb2.ReadStreamRequest, ctx, stderr: bool):
        container = self.sandbox.get(req.container_id)
        proc = container.find_stream_owner(req.exec_id)
        proc.check_served("stderr" if stderr else "stdout")
        stream = proc.stdout if (proc.terminal or not stderr) else proc.stderr
        if stream is None:
            raise FailedPrecondition(f"process {proc.exec_id} has no {'stderr' if stderr else 'stdout'}")
        try:
            # Output already in the pipe gives a reply that the connection sends
            # straight from the pipe (kagent.stdio.PipeReply), without a task.
            return await stream.reply(req.len, ctx.connection)
        finally:
            container.after_read(proc)

    @eager
    async def ReadStdout(self, req: agent_pb2.ReadStreamRequest, ctx):
        return await self._read(req, ctx, stderr=False)

    @eager
    async def ReadStderr(self, req: agent_pb2.ReadStreamRequest, ctx):
        return await self._read(req, ctx, stderr=True)

    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest, ctx):
        proc = self.sandbox.get(req.container_id).find(req.exec_id)
        if proc.stdin is None:
            raise FailedPrecondition(f"process {proc.exec_id} has no stdin")
        proc.check_served("stdin")
        if not req.data:
            proc.stdin.close()  # empty data is how the host says end-of-input
            return agent_pb2.WriteStreamResponse(len=0)
        try:
            n = await proc.stdin.write(req.data)
        except BrokenPipeError as exc:
            raise FailedPrecondition(f"stdin of process {proc.exec_id} is closed: {exc.strerror}") from None
        return agent_pb2.WriteStreamResponse(len=n)

    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest, ctx):
        proc = self.sandbox.get(req.container_id).find(req.exec_id)
        proc.check_served("stdin")  # a direct stdin ends when the host closes its stream
        if proc.stdin is not None:
            proc.stdin.close()
        return EMPTY

    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest, ctx):
        proc = self.sandbox.get(req.container_id).find(req.exec_id)
        if not proc.terminal or proc.stdin is None:
            raise Unavailable(f"process {proc.exec_id} has no tty")
        proc.stdin.resize(req.row, req.column)
        return EMPTY

    async def GetOOMEvent(self, req, ctx):
        # Long-poll: the id of the next container the kernel OOM-killed a process in.
        cid = await self.agent.oom_events.get()
        return agent_pb2.OOMEvent(container_id=cid)

    # -- resources (cgroups) ----------------------------------------------------

    async def UpdateContainer(self, req: agent_pb2.UpdateContainerRequest, ctx):
        await self.sandbox.update_container(req.container_id, oci.resources_to_dict(req.resources))
        return EMPTY

    async def StatsContainer(self, req: agent_pb2.StatsContainerRequest, ctx):
        stats = await self.sandbox.stats(req.container_id)
        # network_stats stays empty, as upstream: the host reads them from the VM's tap devices.
        return agent_pb2.StatsContainerResponse(cgroup_stats=cgroups.to_proto(stats))

    async def PauseContainer(self, req: agent_pb2.PauseContainerRequest, ctx):
        await self.sandbox.pause_container(req.container_id)
        return EMPTY

    async def ResumeContainer(self, req: agent_pb2.ResumeContainerRequest, ctx):
        await self.sandbox.resume_container(req.container_id)
        return EMPTY

    async def OnlineCPUMem(self, req: agent_pb2.OnlineCPUMemRequest, ctx):
        # ``wait`` is ignored, as upstream: the call is always synchronous.
        await self.sandbox.online_cpu_mem(req.nb_cpus, req.cpu_only)
        return EMPTY


def _ports(req) -> dict[str, int]:
    """The passfd ports of a CreateContainer/ExecProcess request (0 = that stdio uses the RPCs)."""
    return {"stdin": req.stdin_port, "stdout": req.stdout_port, "stderr": req.stderr_port}


def _string_user(su: agent_pb2.StringUser) -> dict:
    return MessageToDict(su, preserving_proto_field_name=True)

