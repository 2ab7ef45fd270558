"""The cgroup manager interface, and what both drivers share.

A ``Manager`` is bound to one container cgroup::

    m = new_manager(parent="kagent")              # the driver follows what is mounted
    m.create("/kubepods/pod1/c1", resources, container_id="c1")
    m.enter()                                     # in a forked child, before it runs anything
    m.apply(pid)                                  # or its parent moves it
    m.set(new_resources, update=True)             # UpdateContainer
    m.stats()                                     # dict shaped like agent_pb2.CgroupStats
    m.freeze(); m.thaw(); m.state()               # Pause/ResumeContainer
    m.kill_all(signal.SIGKILL)                    # SignalProcess "all": freeze → kill → thaw
    watch = m.oom_watch()                         # fd for loop.add_reader; watch.read()
    m.destroy(timeout=5.0)                        # waits (bounded) for the cgroup to empty

or ``m.open(path, container_id=...)`` to bind to a cgroup that exists.  The
cgroup is ``<parent>/<cgroupsPath>`` in every hierarchy (see paths.py).  The
first container of a pod creates the pod cgroup (the parent directory of its
cgroupsPath); in v1 its device list is initialised once, when it is created.

Every method is synchronous and bounded (freeze and destroy wait at most
their timeout): call them from the per-container worker, or from an executor.
Failures raise kagent.errors domain errors whose message names the file and
the value.
"""

from __future__ import annotations

import abc
import errno
import os
import posixpath
import signal
import time
from collections.abc import Mapping
from typing import Any

from kagent import errors
from kagent.log import get_logger

from . import fswrite, paths
from .errors import to_domain
from .oom import OomWatch

__all__ = ["Manager", "new_manager", "update_cpuset_path", "FREEZE_TIMEOUT", "DESTROY_TIMEOUT"]

log = get_logger("cgroups")

FREEZE_TIMEOUT = 5.0
DESTROY_TIMEOUT = 5.0
THAWED, FREEZING, FROZEN = "THAWED", "FREEZING", "FROZEN"


class Manager(abc.ABC):
    """One container's cgroup in every hierarchy of one layout."""

    driver = ""

    def __init__(self, layout: paths.Layout, parent: str, *, default_devices: bool = True) -> None:
        self.layout = layout
        self.parent = posixpath.normpath("/" + parent).strip("/")
        if not self.parent:
            raise errors.InvalidArgument("the agent's cgroup parent must not be the hierarchy root")
        self.default_devices = default_devices
        self.path = ""  # relative to each hierarchy root, set by create()/open()
        self.container_id = ""
        self._log = log

    # -- binding ---------------------------------------------------------------------------------

    def _bind(self, cgroups_path: str, container_id: str) -> None:
        self.path = paths.container_path(cgroups_path, self.parent, container_id)
        self.container_id = container_id
        self._log = log.bind(container_id=container_id, cgroup=self.path) if container_id else log

    def _bound(self) -> str:
        if not self.path:
            raise errors.FailedPrecondition("cgroup manager is not bound to a cgroup (call create or open)")
        return self.path

    @property
    def pod_path(self) -> str | None:
        """The pod cgroup (the container's parent directory), None if that is the agent's parent."""
        pod = paths.parent_of(self._bound())
        return None if pod == self.parent else pod

    def create(self, cgroups_path: str, resources: Mapping[str, Any] | None = None, *,
               container_id: str = "") -> list[str]:
        """Make the container's cgroup (and parents) and apply ``resources``; returns warnings."""
        self._bind(cgroups_path, container_id)
        try:
            self._create(resources)
        except OSError as exc:
            raise to_domain(exc, f"create cgroup {self.path}") from exc
        return self.set(resources or {}, update=False)

    def open(self, cgroups_path: str, *, container_id: str = "") -> Manager:
        """Bind to an existing container cgroup (stats, freeze, update, destroy)."""
        self._bind(cgroups_path, container_id)
        if not any(os.path.isdir(d) for d in self.dirs()):
            raise errors.NotFound(f"cgroup {self.path} does not exist")
        return self

    # -- driver hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def dirs(self) -> list[str]:
        """The container's directory in each hierarchy (deduplicated)."""

    @abc.abstractmethod
    def _create(self, resources: Mapping[str, Any] | None) -> None: ...

    @abc.abstractmethod
    def _procs_file(self) -> str:
        """The cgroup.procs that lists the container's processes."""

    @abc.abstractmethod
    def set(self, resources: Mapping[str, Any], update: bool = False) -> list[str]:
        """Apply OCI ``linux.resources``; returns warnings (settings skipped and why)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """A dict shaped like agent_pb2.CgroupStats (stats.to_proto makes the message)."""

    @abc.abstractmethod
    def _write_freeze(self, frozen: bool) -> None: ...

    @abc.abstractmethod
    def state(self) -> str:
        """"THAWED", "FREEZING" or "FROZEN"."""

    @abc.abstractmethod
    def oom_watch(self) -> OomWatch:
        """An fd that becomes readable on OOM events (see oom.py)."""

    @abc.abstractmethod
    def _oom_counter_file(self) -> str | None:
        """The file whose "oom_kill" line counts the cgroup's OOM kills (None: no memory controller)."""

    def oom_kills(self) -> int:
        """OOM kills in the container's cgroup so far (0 without a memory controller)."""
        path = self._oom_counter_file()
        if path is None:
            return 0
        from .oom import _read_flat

        return (_read_flat(path) or {}).get("oom_kill", 0)

    @abc.abstractmethod
    def update_cpuset(self, guest_cpus: str, container_cpus: str) -> None:
        """The hot-plug rule: widen ancestors to ``guest_cpus``, then set the container's cpus."""

    # -- processes -------------------------------------------------------------------------------

    def apply(self, pid: int) -> None:
        """Move ``pid`` into the container's cgroup in every hierarchy."""
        self._bound()
        items = [(os.path.join(d, "cgroup.procs"), str(pid)) for d in self.dirs() if os.path.isdir(d)]
        try:
            fswrite.write_batch(items)
        except OSError as exc:
            raise to_domain(exc, f"move process {pid} into cgroup {self.path}") from exc

    #: the file through which a process moves itself (``enter``); v1 says "tasks"
    self_file = "cgroup.procs"

    def enter(self) -> None:
        """Move the calling process into the container's cgroup in every hierarchy: what a
        child just forked (one thread) does first, in place of ``apply(pid)`` by its parent.

        Written as 0 ("me") to each hierarchy's ``self_file``.  On v1 that is ``tasks``, and a
        thread that moves itself does not take the kernel's global cgroup_threadgroup_rwsem;
        a pid written to cgroup.procs does, and the first writer after an idle moment waits
        there for an RCU grace period (p50 2.9 ms, p90 9.7 ms on these machines, against
        0.4 ms for 8 hierarchies this way: most of a container create's idle time)."""
        self._bound()
        items = [(os.path.join(d, self.self_file), "0") for d in self.dirs() if os.path.isdir(d)]
        try:
            fswrite.write_batch(items)
        except OSError as exc:
            raise to_domain(exc, f"enter cgroup {self.path}") from exc

    def pids(self) -> list[int]:
        """The processes in the container's cgroup."""
        self._bound()
        try:
            with open(self._procs_file()) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    # -- freezer ---------------------------------------------------------------------------------

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every process and wait until the kernel says FROZEN (bounded)."""
        self._bound()
        deadline = time.monotonic() + timeout
        delay = 0.0005
        try:
            self._write_freeze(True)
            rewrites = 0
            while (st := self.state()) != FROZEN:
                if time.monotonic() >= deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
                rewrites += 1
                if rewrites % 25 == 0:
                    self._write_freeze(True)  # a task that raced with the freeze (fork) is caught again
        except OSError as exc:
            raise to_domain(exc, f"freeze cgroup {self.path}") from exc
        if st != FROZEN:
            self.thaw()
            raise errors.DeadlineExceeded(f"cgroup {self.path} did not freeze within {timeout:g}s (state {st})")

    def thaw(self) -> None:
        self._bound()
        try:
            self._write_freeze(False)
        except OSError as exc:
            raise to_domain(exc, f"thaw cgroup {self.path}") from exc

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process in the cgroup, frozen so that none forks meanwhile; returns the count."""
        frozen = False
        try:
            self.freeze()
            frozen = True
        except errors.AgentError as exc:
            self._log.warning("kill_all: freezing failed, signalling unfrozen", error=str(exc))
        try:
            count = 0
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                    count += 1
                except ProcessLookupError:
                    continue
            return count
        finally:
            if frozen:
                self.thaw()

    # -- removal ---------------------------------------------------------------------------------

    def destroy(self, timeout: float = DESTROY_TIMEOUT) -> None:
        """Wait (at most ``timeout``) until the cgroup is empty, then remove it everywhere."""
        self._bound()
        deadline = time.monotonic() + timeout
        delay = 0.001
        pending = [d for d in self.dirs() if os.path.isdir(d)]
        while pending:
            left = []
            for d in pending:
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise to_domain(exc, f"remove cgroup {d}") from exc
                    left.append(d)
            pending = left
            if not pending:
                break
            if time.monotonic() >= deadline:
                pids = self.pids()
                raise errors.DeadlineExceeded(
                    f"cgroup {self.path} is still busy after {timeout:g}s"
                    + (f" (processes {pids[:10]})" if pids else " (it has child cgroups or dying tasks)")
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._log.debug("cgroup removed")


def new_manager(parent: str, *, layout: paths.Layout | None = None, default_devices: bool = True) -> Manager:
    """The manager for what is mounted (v1 and hybrid → v1 driver; cgroup2 alone → v2)."""
    layout = layout or paths.Layout.discover()
    if layout.driver == "v2":
        from .v2 import V2Manager

        return V2Manager(layout, parent, default_devices=default_devices)
    from .v1 import V1Manager

    return V1Manager(layout, parent, default_devices=default_devices)


def update_cpuset_path(guest_cpus: str, cgroups_path: str, container_cpus: str, *, parent: str,
                       container_id: str = "", layout: paths.Layout | None = None) -> None:
    """OnlineCPUMem's cpuset rule for one container (its spec's cgroupsPath and cpu.cpus)."""
    m = new_manager(parent, layout=layout).open(cgroups_path, container_id=container_id)
    m.update_cpuset(guest_cpus, container_cpus)


def widen_agent_cpuset(parent: str, guest_cpus: str, *, layout: paths.Layout | None = None) -> None:
    """OnlineCPUMem: give the agent's cgroups (v1 cpuset) the guest's online CPUs, top-down.
    v2 needs nothing: an empty cpuset.cpus there means "the parent's"."""
    layout = layout or paths.Layout.discover()
    root = layout.v1.get("cpuset")
    if root is None or not os.path.isdir(os.path.join(root, parent)):
        return
    from .cpuset import widen_tree

    try:
        widen_tree(root, parent, guest_cpus)
    except OSError as exc:
        raise to_domain(exc, f"widen the cpuset of {parent}") from exc
