"""The supervisor: owns everything the host sees (ttRPC, sandbox state, logs).

It runs one uvloop event loop.  The zygote was forked before the loop existed;
the supervisor talks to it over a socketpair and notices its death as EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from kagent import ipc, tracing
from kagent import log as klog
from kagent.cgroups import OomEvents
from kagent.config import AgentConfig
from kagent.devices import handlers
from kagent.devices.listener import UeventListener
from kagent.devices.registry import DeviceRegistry
from kagent.metrics import AgentMetrics
from kagent.podsetup import PodSetup
from kagent.policy import AgentPolicy
from kagent.rpcmetrics import RpcMetrics
from kagent.sandbox import DEFAULT_RUN_DIR, Sandbox
from kagent.service import build_routes, implemented
from kagent.service.health import HealthService
from kagent.storage import StorageManager, handler_names
from kagent.ttrpc.limits import Limits
from kagent.ttrpc.server import Server
from kagent.zygote import ZygoteHandle, exit_status

_log = klog.get_logger("agent")


class Agent:
    def __init__(self, config: AgentConfig, zygote: ZygoteHandle | None) -> None:
        self.config = config
        self.zygote = zygote
        self.zygote_channel: ipc.Channel | None = None
        self.server: Server | None = None
        self.sandbox: Sandbox | None = None
        self.oom_events = OomEvents()  # container ids of OOM kills, for GetOOMEvent
        self.run_dir = os.environ.get("KAGENT_RUN_DIR") or DEFAULT_RUN_DIR  # tests use their own
        self.devices = DeviceRegistry(hotplug_timeout=config.hotplug_timeout)
        self.storages = StorageManager(self.devices, run_dir=self.run_dir,
                                       watch_root=os.path.join(self.run_dir, "shared", "containers", "watchable"),
                                       hotplug_timeout=config.hotplug_timeout)
        self.storage_handlers = handler_names()  # reported by GetGuestDetails
        self.pod = PodSetup(run_dir=self.run_dir)
        self.policy = AgentPolicy.load(config.policy_file)  # none configured: everything allowed
        self.uevents: UeventListener | None = None
        self.metrics = AgentMetrics()
        self.rpc_metrics = RpcMetrics(self.metrics, self)
        self.console = None  # kagent.console.DebugConsole when agent.debug_console
        self.log_forwarder = None  # kagent.logforward.LogForwarder when agent.log_vport
        self.metrics_endpoint = None  # kagent.rpcmetrics.MetricsEndpoint when agent.metrics_addr
        self.passfd = None  # kagent.passfd.Listener when agent.passfd_listener_port
        self._stop = asyncio.Event()
        self.exit_code = 0

    def services(self) -> list[object]:
        from kagent.service.containers import ContainerService
        from kagent.service.guest import GuestService
        from kagent.service.network import NetworkService
        from kagent.service.policy import PolicyService
        from kagent.service.sandbox import SandboxService

        return [HealthService(), SandboxService(self), ContainerService(self), GuestService(self),
                PolicyService(self),
                NetworkService(self, wait_for_device=self.wait_for_net_device)]

    # -- device waits the services use ---------------------------------------

    async def wait_for_net_device(self, pci_path: str, timeout: float) -> str:
        return await handlers.net_pci(self.devices, pci_path, timeout=timeout)

    async def wait_for_pci_block(self, pci_path: str) -> str:
        return await handlers.virtio_blk_pci(self.devices, pci_path, timeout=self.config.hotplug_timeout)

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            _log.info("stopping", reason=reason)
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, f"signal {signal.Signals(sig).name}")
        if self.zygote is not None:
            self.zygote_channel = ipc.Channel(self.zygote.sock, self._on_zygote_event, name="zygote")
            # uvloop keeps SIGCHLD for itself; the zygote's death shows as EOF on its socket.
            self.zygote_channel.closed.add_done_callback(lambda _: self._on_zygote_gone())
        self.sandbox = Sandbox(self, self.run_dir)
        self._check_pipe_size()
        self._start_uevents()  # before serving: no hot-plug event may be missed
        self._start_passfd()
        await self._start_observability()
        routes = build_routes(self.services())
        # The policy innermost: what it refuses is still traced; the metrics count every call.
        # Without a policy, its interceptor joins only when SetPolicy installs one.
        interceptors = [*tracing.interceptors()]
        if self.policy.enforcing:
            interceptors.append(self.policy.interceptor)
        self.server = Server(routes, limits=Limits.from_config(self.config), observers=[self.rpc_metrics],
                             interceptors=interceptors)
        self.policy.on_enforcing = lambda: self.server.interceptors.append(self.policy.interceptor)
        try:
            await self.server.start(self.config.server_addr)
        except (OSError, ValueError) as exc:
            _log.critical("cannot listen", address=self.config.server_addr, error=str(exc))
            await self._shutdown()
            return 1
        _log.info("kagent ready", address=self.config.server_addr,
                  rpcs_implemented=len(implemented(routes)), rpcs=len(routes))
        await self._stop.wait()
        await self._shutdown()
        return self.exit_code

    def _check_pipe_size(self) -> None:
        """agent.container_pipe_size above the kernel's pipe-max-size: a guest owns its kernel,
        so as its init the agent raises the limit; elsewhere it must not touch a host-wide
        setting, and CreateContainer will fail with a clear error instead."""
        from kagent.runtime.stdio import pipe_max_size, raise_pipe_max_size

        size = self.config.container_pipe_size
        try:
            limit = pipe_max_size()
        except (OSError, ValueError):
            return
        if size <= limit:
            return
        if os.getpid() == 1:
            try:
                raise_pipe_max_size(size)
                _log.info("raised /proc/sys/fs/pipe-max-size for agent.container_pipe_size", old=limit, new=size)
            except OSError as exc:
                _log.error("cannot raise pipe-max-size", wanted=size, limit=limit, error=str(exc))
        else:
            _log.warning("agent.container_pipe_size exceeds /proc/sys/fs/pipe-max-size and the agent is not "
                         "the guest's init: containers will fail to create", size=size, limit=limit)

    async def _start_observability(self) -> None:
        """Log forwarding, tracing, the metrics endpoint and the debug console: each one that
        cannot start is logged, and the agent goes on without it."""
        from kagent import logforward
        from kagent.console import DebugConsole
        from kagent.rpcmetrics import MetricsEndpoint

        cfg = self.config
        if cfg.log_vport or cfg.log_addr:
            fwd = logforward.LogForwarder()
            fwd.install()
            try:
                await fwd.start(cfg.log_addr or logforward.address_for(cfg.log_vport))
                self.log_forwarder = fwd
            except (OSError, ValueError) as exc:
                fwd.uninstall()
                _log.error("log forwarding not started", vport=cfg.log_vport, error=str(exc))
        if cfg.tracing:
            try:
                tracing.setup(vsock_address=None if cfg.trace_file else cfg.trace_addr, file_path=cfg.trace_file)
            except (OSError, ValueError, ImportError) as exc:
                _log.error("tracing not started", error=str(exc))
        if cfg.metrics_addr:
            endpoint = MetricsEndpoint(self.metrics, cfg.metrics_addr)
            try:
                await endpoint.start()
                self.metrics_endpoint = endpoint
            except (OSError, ValueError) as exc:
                _log.error("metrics endpoint not started", address=cfg.metrics_addr, error=str(exc))
        if cfg.debug_console or cfg.debug_console_addr:
            console = DebugConsole.from_config(self.zygote_channel, cfg.debug_console_vport, cfg.debug_console_addr)
            if console is not None and await console.start():
                self.console = console

    async def _stop_observability(self) -> None:
        if self.console is not None:
            await self.console.close()
            self.console = None
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
            self.metrics_endpoint = None
        if tracing.enabled():
            await asyncio.to_thread(tracing.shutdown)  # flushes the spans still queued

    def _start_passfd(self) -> None:
        """The listener for direct stdio streams; without it, requests naming ports fail clearly."""
        cfg = self.config
        if not (cfg.passfd_listener_port or cfg.passfd_listener_addr):
            return
        from kagent import passfd

        listener = passfd.Listener(cfg.passfd_listener_addr or f"vsock://-1:{cfg.passfd_listener_port}")
        try:
            listener.start()
        except (OSError, ValueError) as exc:
            _log.error("passfd listener not started: direct stdio streams unavailable",
                       address=str(listener.address), error=str(exc))
            return
        self.passfd = listener

    def _start_uevents(self) -> None:
        self.uevents = UeventListener(self.devices)
        try:
            self.uevents.start()
        except OSError as exc:
            _log.error("uevent listener not started: device waits will time out", error=str(exc))
            self.uevents = None

    async def _shutdown(self) -> None:
        await self._stop_observability()
        if self.uevents is not None:
            self.uevents.close()
            self.uevents = None
        if self.server is not None:
            await self.server.close()
        if self.sandbox is not None:
            await self.sandbox.destroy()
        if self.passfd is not None:
            self.passfd.close()
            self.passfd = None
        for problem in await self.storages.destroy_all():
            _log.warning("storage not released", problem=problem)
        await self.pod.destroy()
        self.oom_events.close()
        if self.zygote_channel is not None:
            self.zygote_channel.close()  # EOF: the zygote exits by itself
        if self.zygote is not None:
            with contextlib.suppress(ProcessLookupError):
                for _ in range(100):
                    pid, status = os.waitpid(self.zygote.pid, os.WNOHANG)
                    if pid:
                        break
                    await asyncio.sleep(0.01)
                else:
                    os.kill(self.zygote.pid, signal.SIGKILL)
                    os.waitpid(self.zygote.pid, 0)
            self.zygote = None
        _log.info("stopped")
        if self.log_forwarder is not None:  # last: "stopped" reaches the host
            await self.log_forwarder.close()
            self.log_forwarder.uninstall()
            self.log_forwarder = None

    def _on_zygote_gone(self) -> None:
        if self.zygote is None or self._stop.is_set():
            return  # shutting down: _shutdown reaps it
        # Reap only the children we know: libuv reaps its own subprocesses.
        status = -1
        with contextlib.suppress(ChildProcessError):
            for _ in range(50):
                pid, raw = os.waitpid(self.zygote.pid, os.WNOHANG)
                if pid:
                    status = exit_status(raw)
                    break
                time.sleep(0.002)
        _log.error("zygote died; new containers cannot be created", zygote_pid=self.zygote.pid,
                   status=status)
        self.zygote = None

    def _on_zygote_event(self, event: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        _log.debug("zygote event", kind=event.get("event"), worker_pid=event.get("pid"), status=event.get("status"))
