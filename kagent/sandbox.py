"""Sandbox state: the containers of this pod and their life cycle.

The service layer calls these methods; they validate what the host sent, ask
the zygote for a worker per container, and keep the supervisor-side state
(kagent.container) that the stdio and wait RPCs use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kagent import ipc, passfd, tracing
from kagent import log as klog
from kagent.container import Container, Process
from kagent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from kagent.agent import Agent

_log = klog.get_logger("sandbox")

# Upstream's rule for container ids: no path tricks, no empty names.  Exec ids
# never become paths here, but get the same alphabet (one character is enough).
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]+$")
EXEC_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_RUN_DIR = "/run/kata-containers"
WORKER_EXIT_GRACE = 2.0  # after a failed create: how long the worker may take to go by itself
CGROUP_REMOVE_TIMEOUT = 10.0


def check_id(kind: str, value: str, pattern: re.Pattern = ID_RE) -> str:
    # fullmatch: with match(), "$" would also accept an id ending in a newline.
    if not pattern.fullmatch(value or "") or len(value) > 256:
        raise InvalidArgument(f"invalid {kind} {value!r}: must match {pattern.pattern}")
    return value


class Sandbox:
    def __init__(self, agent: Agent, run_dir: str = DEFAULT_RUN_DIR) -> None:
        self.agent = agent
        self.run_dir = run_dir
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        # (cid, exec_id) of the ExecProcess calls in flight: None, or the undo of one that failed.
        self._execing: dict[tuple[str, str], asyncio.Task | None] = {}
        self.first_cid = ""  # its pid namespace is the sandbox's when sandbox_pidns asks for it

    # -- helpers ------------------------------------------------------------

    def get(self, cid: str) -> Container:
        container = self.containers.get(cid)
        if container is None:
            raise NotFound(f"container {cid!r} not found")
        return container

    async def _spawn_worker(self, cid: str) -> tuple[ipc.Channel, int, int]:
        """A worker for ``cid``: its channel, its pid and a pidfd (to wait for it, or kill it)."""
        zygote = self.agent.zygote_channel
        if zygote is None or zygote.closed.done():
            raise Unavailable("the zygote is gone: no new containers can be created")
        mine, theirs = ipc.socketpair()
        try:
            try:
                reply, fds = await zygote.request({"op": "spawn", "entry": "container", "args": {"cid": cid}},
                                                  [theirs.fileno()])
            except ipc.ChannelClosed:
                raise Unavailable("the zygote is gone: no new containers can be created") from None
            finally:
                theirs.close()
            for fd in fds:
                os.close(fd)
            if "error" in reply:
                cls = ResourceExhausted if reply.get("kind") == "fds" else Unavailable
                raise cls(f"cannot start a worker for container {cid}: {reply['error']}")
            pid = int(reply["pid"])
            # The worker blocks reading `mine` until we write or close it: its pid is not reused yet.
            pidfd = os.pidfd_open(pid)
        except BaseException:
            mine.close()  # EOF: a worker that was forked exits at once
            raise
        try:
            return ipc.Channel(mine, name=f"worker {cid}"), pid, pidfd
        except BaseException:
            os.close(pidfd)
            mine.close()
            raise

    def _write_bundle(self, cid: str, spec: dict[str, Any]) -> str:
        bundle = os.path.join(self.run_dir, cid)
        os.makedirs(bundle, mode=0o711, exist_ok=True)
        tmp = os.path.join(bundle, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(spec, f)
        os.replace(tmp, os.path.join(bundle, "config.json"))
        return bundle

    def _remove_bundle(self, cid: str) -> None:
        bundle = os.path.join(self.run_dir, cid)
        if os.path.dirname(os.path.normpath(bundle)) == os.path.normpath(self.run_dir):
            remove_tree_within_filesystem(bundle)

    def _sandbox_pidns(self, cid: str) -> str:
        """The pid namespace to join: the first container's (the pod's pause container)."""
        first = self.containers.get(self.first_cid)
        init = first.processes.get(first.cid) if first is not None else None
        if init is None or init.exited.done():
            raise FailedPrecondition(f"container {cid} asks for the sandbox's pid namespace, but the "
                                     "sandbox's first container is not running")
        return f"/proc/{init.pid}/ns/pid"

    # -- life cycle ----------------------------------------------------------

    async def create_container(self, cid: str, spec: dict[str, Any], *, pipe_size: int, storages=(),
                               sandbox_pidns: bool = False, ports: dict[str, int] | None = None) -> Container:
        check_id("container id", cid)
        if cid in self.containers or cid in self._creating:
            raise AlreadyExists(f"container {cid} already exists")
        if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
            raise InvalidArgument(f"container {cid}: the OCI spec has no process.args")
        if not isinstance(spec.get("root"), dict) or not spec["root"].get("path"):
            raise InvalidArgument(f"container {cid}: the OCI spec has no root.path")
        self._creating.add(cid)
        made = _Made(cid)  # what this attempt has made so far: all undone if it fails
        try:
            made.claimed = claimed = await self.claim_streams(ports or {})
            pod = self.agent.pod
            pidns = None
            if (sandbox_pidns or pod.sandbox_pidns) and self.first_cid and cid != self.first_cid:
                pidns = self._sandbox_pidns(cid)
            if pod.created or pidns:  # join the pod's IPC/UTS (and pid) namespaces, add guest hooks
                spec = pod.container_spec(spec, pidns_path=pidns)
            if storages:
                made.stored = True
                with tracing.span("storage mount", container_id=cid, storages=len(storages)):
                    await self.agent.storages.add(storages, cid)
            bundle = self._write_bundle(cid, spec)
            made.cgroup = await asyncio.to_thread(self._new_cgroup, cid, spec)
            with tracing.span("worker fork", container_id=cid):
                channel, worker_pid, made.worker = await self._spawn_worker(cid)
            made.container = container = Container(cid, bundle, spec, channel, worker_pid)
            channel.on_event = container.on_event
            with tracing.span("container set-up", container_id=cid):  # the worker's steps: its children
                reply, fds = await container.request("create", spec=spec, bundle=bundle, pipe_size=pipe_size,
                                                     cgroup_parent=self.agent.config.cgroup_parent,
                                                     timings=tracing.enabled())
                tracing.record_steps(reply.get("timings"))
            made.init = init = Process.from_reply(cid, reply, fds, is_init=True)
            if claimed is not None:
                init.attach_streams(claimed)
            container.add(init)
            container.attach_cgroup(self.agent.config.cgroup_parent, reply.get("cgroup_path") or "")
            self._watch_oom(container)
            for warning in reply.get("warnings") or ():
                _log.warning("container set-up", container_id=cid, warning=warning)
            container.state = "created"
        except BaseException:
            # Shielded: a second cancellation (deadline, then disconnect) must not stop the
            # undo half-way; the id stays taken until it is done.
            undo = asyncio.ensure_future(self._undo_create(made))
            _UNDOING.add(undo)
            undo.add_done_callback(_UNDOING.discard)
            await asyncio.shield(undo)
            raise
        os.close(made.worker)
        self.containers[cid] = container
        self._creating.discard(cid)
        self.first_cid = self.first_cid or cid
        _log.info("container created", container_id=cid, init_pid=reply["pid"], worker_pid=worker_pid)
        return container

    def _new_cgroup(self, cid: str, spec: dict[str, Any]) -> str:
        """The cgroup the worker will make for this container, "" if it makes none that a failed
        create should remove: no cgroup parent, a cgroupsPath it will refuse anyway, or a cgroup
        that exists already (another container's: never this one's to kill and remove)."""
        parent = self.agent.config.cgroup_parent
        if not parent:
            return ""
        from kagent.cgroups import container_path, new_manager

        cgroups_path = (spec.get("linux") or {}).get("cgroupsPath") or ""
        try:
            path = container_path(cgroups_path, parent, cid)
            new_manager(parent).open(cgroups_path, container_id=cid)
        except NotFound:
            return path
        except AgentError:
            return ""
        return ""

    async def _undo_create(self, made: _Made) -> None:
        """The one way out of a failed CreateContainer, whatever step failed: the worker told to
        go (EOF) and killed if it does not, what is in the cgroup it made killed and the cgroup
        removed, the init's fds closed, streams, storages and bundle released.  The worker may
        be dead already (its cgroup then holds what it left), or busy (running a hook)."""
        cid = made.cid
        try:
            if made.claimed is not None:
                made.claimed.release()  # a no-op once the pumps own them
            self.agent.oom_events.unwatch(cid)
            container = made.container
            if container is not None:
                container.state = "removed"  # we end the worker: not a "worker died" error
                container.close_all()
                container.channel.close()  # EOF: the worker kills what it made and exits
            if made.init is not None:
                made.init.close()  # not added when its streams could not be attached
            if made.worker >= 0:
                await _end_process(made.worker, WORKER_EXIT_GRACE)
            # Only now is nobody left to make the cgroup, or to put a process in it.
            if container is not None and made.cgroup and not self._cgroup_in_use(made.cgroup):
                await asyncio.to_thread(self._remove_new_cgroup, container)
            if made.stored:  # before the bundle: a storage may be mounted inside it
                await self.agent.storages.remove(cid)
            self._remove_bundle(cid)
        except Exception as exc:
            _log.warning("failed create not fully undone", container_id=cid, error=str(exc))
        finally:
            if made.worker >= 0:
                os.close(made.worker)
            self._creating.discard(cid)

    def _cgroup_in_use(self, path: str) -> bool:
        """Whether another container's cgroup is ``path`` or below it."""
        return any(c.cgroup is not None and (c.cgroup.path == path or c.cgroup.path.startswith(path + "/"))
                   for c in self.containers.values())

    def _remove_new_cgroup(self, container: Container) -> None:
        """Kill what is in the cgroup a failed create's worker made, and remove it."""
        if container.cgroup is None:
            from kagent.cgroups import new_manager

            cgroups_path = (container.spec.get("linux") or {}).get("cgroupsPath") or ""
            try:
                container.cgroup = new_manager(self.agent.config.cgroup_parent).open(cgroups_path,
                                                                                     container_id=container.cid)
            except AgentError:
                return  # the worker never made it (or removed it)
        container.destroy_cgroup(CGROUP_REMOVE_TIMEOUT)

    def _watch_oom(self, container: Container) -> None:
        """Watch for OOM kills before the init can run: one that came before the watch
        (a container that allocates at once) would never be reported."""
        if container.cgroup is None:
            return
        try:
            self.agent.oom_events.watch(container.cid, container.cgroup.oom_watch())
        except Exception as exc:  # OOM reporting is best effort; the container runs
            _log.warning("no OOM events for this container", container_id=container.cid, error=str(exc))

    async def start_container(self, cid: str) -> None:
        container = self.get(cid)
        async with container.lock:
            if container.state != "created":
                raise FailedPrecondition(f"container {cid} is {container.state}, not created")
            await container.request("start")
            container.state = "running"

    async def claim_streams(self, ports: dict[str, int]):
        """The host's direct stdio streams for a new process (kagent.passfd), or None without ports."""
        if not any(ports.values()):
            return None
        listener = self.agent.passfd
        if listener is None:
            raise FailedPrecondition("direct stdio streams (stdin/stdout/stderr_port) need the passfd "
                                     "listener: agent.passfd_listener_port is not set")
        return await passfd.claim(listener, **{f"{name}_port": port for name, port in ports.items()})

    async def exec_process(self, cid: str, exec_id: str, process: dict[str, Any], *, pipe_size: int,
                           ports: dict[str, int] | None = None) -> Process:
        container = self.get(cid)
        check_id("exec id", exec_id, EXEC_ID_RE)
        key = (cid, exec_id)
        undoing = self._execing.get(key)
        if undoing is not None:  # a failed exec of this id is being undone (a retry after a deadline)
            await asyncio.shield(undoing)
            container = self.get(cid)
        if exec_id in container.processes or exec_id == cid or key in self._execing:
            raise AlreadyExists(f"exec id {exec_id} already exists in container {cid}")
        if container.state != "running":
            raise FailedPrecondition(f"container {cid} is {container.state}, not running")
        if not process.get("args"):
            raise InvalidArgument(f"exec {exec_id}: process.args is empty")
        # Taken until the exec is added or undone: a failed exec's undo finds its process by
        # this id, which no other exec may then hold.
        self._execing[key] = None
        claimed = proc = undo = None
        asked = False  # the worker may have started a process for this exec
        pid = None
        try:
            # The streams first: a missing one fails the call before the process runs.
            claimed = await self.claim_streams(ports or {})
            asked = True
            reply, fds = await container.request("exec", exec_id=exec_id, process=process, pipe_size=pipe_size)
            try:
                pid = int(reply["pid"])
                proc = Process.from_reply(exec_id, reply, fds)
            except BaseException:
                for fd in fds:  # a reply not shaped as an exec's
                    os.close(fd)
                raise
            if claimed is not None:
                proc.attach_streams(claimed)
        except BaseException as exc:
            if claimed is not None:
                claimed.release()  # a no-op once the pumps own them
            if proc is not None:
                proc.close()
            if isinstance(exc, ipc.FdsLost):
                pid = exc.record.get("pid")  # started, then its pidfd and stdio lost on the way
            # An error the worker answered (or its death) started nothing; anything else may have.
            if pid is not None or (asked and not isinstance(exc, AgentError)):
                # Shielded, as a failed create's undo; the id stays taken until it is done.
                self._execing[key] = undo = asyncio.ensure_future(self._undo_exec(container, exec_id, pid))
                _UNDOING.add(undo)
                undo.add_done_callback(lambda task: self._exec_undone(key, task))
                await asyncio.shield(undo)
            raise
        finally:
            if undo is None:
                del self._execing[key]
        container.add(proc)
        return proc

    def _exec_undone(self, key: tuple[str, str], undo: asyncio.Task) -> None:
        _UNDOING.discard(undo)
        if self._execing.get(key) is undo:
            del self._execing[key]

    async def _undo_exec(self, container: Container, exec_id: str, pid: int | None) -> None:
        """A failed ExecProcess leaves nothing: the worker kills and reaps the process it may
        have started, without reporting its exit; an exit it reported already is dropped."""
        try:
            await container.request("discard", exec_id=exec_id, pid=pid)
        except Exception as exc:
            _log.warning("failed exec not fully undone", container_id=container.cid, exec_id=exec_id,
                         error=str(exc))
        container.forget(exec_id)

    async def signal_process(self, cid: str, exec_id: str, sig: int) -> None:
        container = self.get(cid)
        if not 0 < sig < signal.NSIG:
            raise InvalidArgument(f"invalid signal {sig}")
        if not exec_id and sig == signal.SIGKILL:
            await container.request("kill_all", signal=sig)  # "all": every process of the container
            return
        proc = container.find(exec_id)
        if proc.is_init and sig == signal.SIGTERM and not handles_signal(proc.pid, sig):
            # A pid-namespace init ignores signals it has no handler for: SIGTERM would do nothing.
            sig = signal.SIGKILL
        proc.signal(sig)

    async def wait_process(self, cid: str, exec_id: str) -> int:
        container = self.get(cid)
        proc = container.find(exec_id)
        status = await proc.exit_status()
        container.retire(proc)
        return status

    async def remove_container(self, cid: str, timeout: float) -> None:
        container = self.get(cid)
        async with container.lock:
            try:
                await asyncio.wait_for(container.request("destroy", timeout=timeout or 0),
                                       timeout + 1 if timeout else None)
            except TimeoutError:
                raise FailedPrecondition(f"container {cid} not removed within {timeout}s") from None
            except Unavailable:
                # The worker died: its processes were killed through their pidfds; the
                # cgroup it made is ours to remove.
                await asyncio.to_thread(container.destroy_cgroup, timeout or 10)
            self.agent.oom_events.unwatch(cid)
            container.state = "removed"
            container.channel.close()
            container.close_all()
            self.containers.pop(cid, None)
            await self.agent.storages.remove(cid)  # before the bundle: storages may be mounted in it
            self._remove_bundle(cid)
            _log.info("container removed", container_id=cid)

    # -- resources (cgroups) ---------------------------------------------------

    def _cgroup(self, container: Container):
        if container.cgroup is None:
            raise FailedPrecondition(f"container {container.cid} has no cgroup")
        return container.cgroup

    async def pause_container(self, cid: str) -> None:
        container = self.get(cid)
        async with container.lock:
            if container.state not in ("running", "created"):
                raise FailedPrecondition(f"container {cid} is {container.state}: only a running or created one "
                                         "can be paused")
            await asyncio.to_thread(self._cgroup(container).freeze)
            container.paused_from, container.state = container.state, "paused"

    async def resume_container(self, cid: str) -> None:
        container = self.get(cid)
        async with container.lock:
            if container.state != "paused":
                raise FailedPrecondition(f"container {cid} is {container.state}, not paused")
            await asyncio.to_thread(self._cgroup(container).thaw)
            container.state = container.paused_from or "running"

    async def update_container(self, cid: str, resources: dict[str, Any]) -> list[str]:
        container = self.get(cid)
        async with container.lock:
            warnings = await asyncio.to_thread(self._cgroup(container).set, resources, True)
            linux = container.spec.setdefault("linux", {})
            linux["resources"] = {**(linux.get("resources") or {}), **resources}
            return warnings

    async def stats(self, cid: str) -> dict[str, Any]:
        container = self.get(cid)
        return await asyncio.to_thread(self._cgroup(container).stats)

    async def online_cpu_mem(self, nb_cpus: int, cpu_only: bool) -> None:
        """OnlineCPUMem: bring CPUs (and memory) online, then the seed's cpuset rule."""
        from kagent import cgroups

        if nb_cpus > 0:
            await cgroups.online_cpus(nb_cpus)
        if not cpu_only:
            await asyncio.to_thread(cgroups.online_memory)
        if nb_cpus <= 0:
            return
        guest = await asyncio.to_thread(cgroups.guest_cpus)
        await asyncio.to_thread(cgroups.widen_agent_cpuset, self.agent.config.cgroup_parent, guest)
        for container in list(self.containers.values()):
            cpus = ((container.spec.get("linux") or {}).get("resources") or {}).get("cpu", {}).get("cpus")
            if container.cgroup is not None and cpus:
                await asyncio.to_thread(container.cgroup.update_cpuset, guest, cpus)

    async def destroy(self) -> None:
        await asyncio.gather(*_UNDOING, return_exceptions=True)  # failed creates undone first
        # The first container (the pod's pause container) last: others may share its pid ns.
        for cid in sorted(self.containers, key=lambda c: c == self.first_cid):
            with contextlib.suppress(Exception):
                await self.remove_container(cid, 10)
        await asyncio.to_thread(remove_empty_cgroups, self.agent.config.cgroup_parent)


@dataclass
class _Made:
    """What one CreateContainer has made so far (what its undo takes back)."""

    cid: str
    claimed: passfd.Claimed | None = None
    stored: bool = False
    cgroup: str = ""  # the cgroup its worker makes ("" = none of its own; see _new_cgroup)
    worker: int = -1  # a pidfd of the worker
    container: Container | None = None
    init: Process | None = None


_UNDOING: set[asyncio.Task] = set()  # undos in flight (one may outlive its cancelled request)


async def _end_process(pidfd: int, grace: float) -> None:
    """Wait ``grace`` seconds for the process to exit by itself, then SIGKILL it and wait."""
    if await _exited(pidfd, grace):
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    await _exited(pidfd, 5.0)


async def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process exits within ``timeout`` (a pidfd polls readable once it has)."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def handles_signal(pid: int, sig: int) -> bool:
    """Whether the process catches, blocks or ignores ``sig`` (from /proc/<pid>/status)."""
    bit = 1 << (sig - 1)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("SigCgt", "SigIgn", "SigBlk") and int(value.strip(), 16) & bit:
                    return True
    except (OSError, ValueError):
        return True  # cannot tell: deliver the signal as asked
    return False


def remove_empty_cgroups(parent: str) -> None:
    """At the end: remove the (empty) pod cgroups and the agent's own parent, bottom up.

    rmdir only succeeds on a cgroup without processes or children, so nothing in
    use is touched; what is still busy stays.
    """
    from kagent.cgroups import Layout

    try:
        layout = Layout.discover()
    except Exception:
        return
    roots = list(layout.v1.values()) + ([layout.unified] if layout.unified else [])
    for root in dict.fromkeys(roots):
        top = os.path.join(root, parent)
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def remove_tree_within_filesystem(top: str) -> None:
    """rm -rf that never enters a mount point (a volume mounted inside a bundle must not
    lose its files) nor follows a symlink; what is mounted stays, and so do its parents."""
    if os.path.ismount(top) or os.path.islink(top) or not os.path.isdir(top):
        return
    dirs = [top]
    for dirpath, dirnames, filenames in os.walk(top, topdown=True):
        keep = []
        for d in dirnames:
            path = os.path.join(dirpath, d)
            if os.path.islink(path):
                filenames.append(d)  # unlink the link itself
            elif not os.path.ismount(path):
                keep.append(d)
                dirs.append(path)
        dirnames[:] = keep
        for name in filenames:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(dirpath, name))
    for path in reversed(dirs):  # children before parents
        with contextlib.suppress(OSError):
            os.rmdir(path)
