"""The cgroup v1 driver: one hierarchy per controller (also serves the hybrid layout).

Kernel ordering rules this driver keeps:
- cpuset: a directory gets cpus and mems (from its parent) before anything joins it;
- memory: limit_in_bytes <= memsw.limit_in_bytes at every moment, so when both
  change, memsw is written first when it grows past the current limit and last
  otherwise (runc's rule); a limit alone above the current memsw is refused
  with a message (as docker does) rather than silently changing swap;
- devices: ``a`` rules cannot be written once a cgroup has children, so the
  pod cgroup's list is set right after it is made, before its first child;
  a child can never allow more than its parent, so a container's allow rules
  are added to the pod cgroup first.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from kagent import errors

from . import cpuset, fswrite, stats
from .errors import to_domain
from .manager import FREEZING, FROZEN, THAWED, Manager
from .oom import V1OomWatch
from .resources import DeviceRule, allows_all, device_rules, hugepage_size, limit_text, num, section

__all__ = ["V1Manager"]

Writes = list[tuple[str, str]]
_UNLIMITED = float("inf")


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _read_limit(path: str) -> float:
    """A v1 limit file as a number; unlimited (PAGE_COUNTER_MAX-ish or -1) → inf."""
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return _UNLIMITED
    return _UNLIMITED if value < 0 or value >= (1 << 62) else float(value)


def _as_limit(value: int) -> float:
    return _UNLIMITED if value < 0 else float(value)


class V1Manager(Manager):
    driver = "v1"
    self_file = "tasks"  # see Manager.enter

    def _dir(self, controller: str) -> str | None:
        root = self.layout.v1.get(controller)
        return os.path.join(root, self._bound()) if root else None

    def dirs(self) -> list[str]:
        seen: list[str] = []
        for d in self.layout.v1_dirs(self._bound()).values():
            if d not in seen:
                seen.append(d)
        return seen

    def _procs_file(self) -> str:
        for controller in ("memory", "pids", "freezer", "cpu"):
            d = self._dir(controller)
            if d and os.path.isdir(d):
                return os.path.join(d, "cgroup.procs")
        return os.path.join(self.dirs()[0], "cgroup.procs")

    # -- creation ----------------------------------------------------------------------------------

    def _create(self, resources: Mapping[str, Any] | None = None) -> None:
        rel = self._bound()
        parts = rel.split("/")
        pod = self.pod_path
        done_roots: set[str] = set()
        for controller, root in self.layout.v1.items():
            if root in done_roots:
                continue
            done_roots.add(root)
            for depth in range(1, len(parts) + 1):
                level = "/".join(parts[:depth])
                directory = os.path.join(root, level)
                try:
                    os.mkdir(directory, 0o755)
                    created = True
                except FileExistsError:
                    created = False
                if controller == "cpuset":
                    cpuset.init_from_parent(directory)
                if controller == "devices" and created and level == pod:
                    self._init_pod_devices(directory, resources)

    def _init_pod_devices(self, directory: str, resources: Mapping[str, Any] | None) -> None:
        rules = device_rules((resources or {}).get("devices"), defaults=self.default_devices)
        if allows_all(rules):
            return  # the pod keeps its parent's allow-all
        writes = [(os.path.join(directory, "devices.deny"), "a *:* rwm")]
        writes += [(os.path.join(directory, "devices.allow"), r.v1_text()) for r in rules if r.allow]
        fswrite.write_batch(writes)

    # -- resources ---------------------------------------------------------------------------------

    def set(self, resources: Mapping[str, Any], update: bool = False) -> list[str]:
        self._bound()
        warnings: list[str] = []
        writes: Writes = []
        resources = resources or {}
        if resources.get("unified"):
            raise errors.InvalidArgument("resources: 'unified' (cgroup v2 files) cannot be applied on cgroup v1")
        if resources.get("rdma"):
            warnings.append("rdma limits are not supported; skipped")
        self._cpu(section(resources, "cpu"), writes, warnings)
        self._memory(section(resources, "memory"), writes, warnings)
        if "pids" in resources:
            self._pids(section(resources, "pids"), writes, warnings)
        self._blkio(section(resources, "blockIO"), writes, warnings)
        self._hugetlb(resources.get("hugepageLimits") or [], writes, warnings)
        self._network(section(resources, "network"), writes, warnings)
        if not update or resources.get("devices"):
            self._devices(device_rules(resources.get("devices"), defaults=self.default_devices), writes, warnings)
        try:
            fswrite.write_batch(writes)
        except OSError as exc:
            raise to_domain(exc, f"set resources of cgroup {self.path}") from exc
        for w in warnings:
            self._log.warning("cgroup setting skipped", reason=w)
        return warnings

    def _file(self, controller: str, name: str, warnings: list[str], what: str) -> str | None:
        d = self._dir(controller)
        if d is None:
            warnings.append(f"{what}: the {controller} controller is not mounted; skipped")
            return None
        path = os.path.join(d, name)
        if not _exists(path):
            warnings.append(f"{what}: {name} does not exist on this kernel; skipped")
            return None
        return path

    def _cpu(self, cpu: Mapping[str, Any], writes: Writes, warnings: list[str]) -> None:
        for key, name in (("cpus", "cpuset.cpus"), ("mems", "cpuset.mems")):
            value = cpu.get(key)
            if value:
                cpuset.parse_list(value)
                if (path := self._file("cpuset", name, warnings, f"cpu.{key}")):
                    writes.append((path, value))
        for key, name in (("shares", "cpu.shares"), ("period", "cpu.cfs_period_us"), ("quota", "cpu.cfs_quota_us"),
                          ("burst", "cpu.cfs_burst_us"), ("realtimePeriod", "cpu.rt_period_us"),
                          ("realtimeRuntime", "cpu.rt_runtime_us")):
            value = num(cpu, key)
            if value is not None and (path := self._file("cpu", name, warnings, f"cpu.{key}")):
                writes.append((path, str(value)))
        if cpu.get("idle") is not None and (path := self._file("cpu", "cpu.idle", warnings, "cpu.idle")):
            writes.append((path, str(int(cpu["idle"]))))

    def _memory(self, mem: Mapping[str, Any], writes: Writes, warnings: list[str]) -> None:
        if not mem:
            return
        d = self._dir("memory")
        if d is None:
            warnings.append("memory: the memory controller is not mounted; skipped")
            return
        if num(mem, "kernel") is not None:
            self._log.debug("memory.kernel ignored (kernel memory limits are deprecated)")
        limit, swap = num(mem, "limit"), num(mem, "swap")
        memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
        if swap is not None and not _exists(memsw):
            warnings.append("memory.swap: swap accounting is off (no memory.memsw.limit_in_bytes); skipped")
            swap = None
        if limit is not None and swap is not None:
            if limit >= 0 and swap >= 0 and swap < limit:
                raise errors.InvalidArgument(f"resources: memory.swap ({swap}) must be >= memory.limit ({limit})")
            pair = [(os.path.join(d, "memory.limit_in_bytes"), limit_text(limit)), (memsw, limit_text(swap))]
            current = _read_limit(os.path.join(d, "memory.limit_in_bytes"))
            if _as_limit(swap) > current:
                pair.reverse()  # growing past the current limit: memsw first
            writes.extend(pair)
        elif limit is not None:
            if _exists(memsw) and _as_limit(limit) > _read_limit(memsw):
                raise errors.InvalidArgument(
                    f"resources: memory.limit {limit} is above the current memory+swap limit; "
                    "update memory.swap at the same time"
                )
            writes.append((os.path.join(d, "memory.limit_in_bytes"), limit_text(limit)))
        elif swap is not None:
            writes.append((memsw, limit_text(swap)))
        if (value := num(mem, "reservation")) is not None:
            writes.append((os.path.join(d, "memory.soft_limit_in_bytes"), limit_text(value)))
        if (value := num(mem, "kernelTCP")) is not None:
            if (path := self._file("memory", "memory.kmem.tcp.limit_in_bytes", warnings, "memory.kernelTCP")):
                writes.append((path, limit_text(value)))
        swappiness = mem.get("swappiness")
        if swappiness is not None:
            if isinstance(swappiness, bool) or not isinstance(swappiness, int) or not 0 <= swappiness <= 100:
                raise errors.InvalidArgument(f"resources: memory.swappiness {swappiness!r} is not in 0-100")
            writes.append((os.path.join(d, "memory.swappiness"), str(swappiness)))
        if mem.get("disableOOMKiller"):
            writes.append((os.path.join(d, "memory.oom_control"), "1"))

    def _pids(self, pids: Mapping[str, Any], writes: Writes, warnings: list[str]) -> None:
        limit = num(pids, "limit")
        if (path := self._file("pids", "pids.max", warnings, "pids.limit")):
            writes.append((path, str(limit) if limit is not None and limit > 0 else "max"))

    def _blkio(self, blkio: Mapping[str, Any], writes: Writes, warnings: list[str]) -> None:
        if not blkio:
            return
        d = self._dir("blkio")
        if d is None:
            warnings.append("blockIO: the blkio controller is not mounted; skipped")
            return

        def pick(*names: str) -> str | None:
            return next((os.path.join(d, n) for n in names if _exists(os.path.join(d, n))), None)

        for key, names in (("weight", ("blkio.weight", "blkio.bfq.weight")), ("leafWeight", ("blkio.leaf_weight",))):
            if (value := num(blkio, key)) is not None:
                if (path := pick(*names)):
                    writes.append((path, str(value)))
                else:
                    warnings.append(f"blockIO.{key}: no {' or '.join(names)} on this kernel; skipped")
        for dev in blkio.get("weightDevice") or []:
            for key, names in (("weight", ("blkio.weight_device", "blkio.bfq.weight_device")),
                               ("leafWeight", ("blkio.leaf_weight_device",))):
                if (value := num(dev, key)) is not None:
                    if (path := pick(*names)):
                        writes.append((path, f"{int(dev['major'])}:{int(dev['minor'])} {value}"))
                    else:
                        warnings.append(f"blockIO.weightDevice.{key}: no {' or '.join(names)}; skipped")
        for key, name in (("throttleReadBpsDevice", "blkio.throttle.read_bps_device"),
                          ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device"),
                          ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device"),
                          ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device")):
            for dev in blkio.get(key) or []:
                writes.append((os.path.join(d, name), f"{int(dev['major'])}:{int(dev['minor'])} {int(dev.get('rate', 0))}"))

    def _hugetlb(self, limits: list, writes: Writes, warnings: list[str]) -> None:
        for limit in limits:
            size = hugepage_size(limit)
            name = f"hugetlb.{size}.limit_in_bytes"
            if (path := self._file("hugetlb", name, warnings, f"hugepageLimits {size}")):
                writes.append((path, str(int(limit.get("limit", 0)))))

    def _network(self, net: Mapping[str, Any], writes: Writes, warnings: list[str]) -> None:
        if (class_id := num(net, "classID")) is not None:
            if (path := self._file("net_cls", "net_cls.classid", warnings, "network.classID")):
                writes.append((path, str(class_id)))
        for prio in net.get("priorities") or []:
            if (path := self._file("net_prio", "net_prio.ifpriomap", warnings, "network.priorities")):
                writes.append((path, f"{prio['name']} {int(prio.get('priority', 0))}"))

    def _devices(self, rules: list[DeviceRule], writes: Writes, warnings: list[str]) -> None:
        d = self._dir("devices")
        if d is None:
            if rules:
                warnings.append("devices: the devices controller is not mounted; skipped")
            return
        pod = self.pod_path
        if pod is not None:
            pod_dir = os.path.join(self.layout.v1["devices"], pod)
            if allows_all(rules):
                extra = ["b *:* rwm", "c *:* rwm"]  # "a" cannot be written to a cgroup with children
            else:
                extra = [r.v1_text() for r in rules if r.allow]
            writes.extend((os.path.join(pod_dir, "devices.allow"), t) for t in extra)
        for r in rules:
            writes.append((os.path.join(d, "devices.allow" if r.allow else "devices.deny"), r.v1_text()))

    # -- stats, freezer, OOM, cpuset ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        wanted: list[tuple[str, str]] = []  # (file name, path)
        for controller, names in stats.V1_FILES.items():
            d = self._dir(controller)
            if d:
                wanted += [(n, os.path.join(d, n)) for n in names]
        sizes: list[str] = []
        hd = self._dir("hugetlb")
        if hd and os.path.isdir(hd):
            sizes = sorted(n.split(".")[1] for n in os.listdir(hd)
                           if n.startswith("hugetlb.") and n.endswith(".limit_in_bytes"))
            for size in sizes:
                for suffix in ("usage_in_bytes", "max_usage_in_bytes", "failcnt"):
                    name = f"hugetlb.{size}.{suffix}"
                    wanted.append((name, os.path.join(hd, name)))
        try:
            contents = fswrite.read_batch([p for _, p in wanted])
        except OSError as exc:
            raise to_domain(exc, f"stats of cgroup {self.path}") from exc
        return stats.v1_stats(dict(zip((n for n, _ in wanted), contents, strict=True)), sizes)

    def _freezer_state(self) -> str:
        d = self._dir("freezer")
        if d is None:
            raise errors.FailedPrecondition("the freezer controller is not mounted")
        return os.path.join(d, "freezer.state")

    def _write_freeze(self, frozen: bool) -> None:
        fswrite.write_batch([(self._freezer_state(), FROZEN if frozen else THAWED)])

    def state(self) -> str:
        try:
            with open(self._freezer_state()) as f:
                text = f.read().strip()
        except FileNotFoundError:
            raise errors.NotFound(f"cgroup {self.path} does not exist") from None
        return text if text in (THAWED, FREEZING, FROZEN) else THAWED

    def _oom_counter_file(self) -> str | None:
        d = self._dir("memory")
        return None if d is None else os.path.join(d, "memory.oom_control")

    def oom_watch(self) -> V1OomWatch:
        d = self._dir("memory")
        if d is None:
            raise errors.FailedPrecondition("the memory controller is not mounted: no OOM events")
        try:
            return V1OomWatch(d)
        except OSError as exc:
            raise to_domain(exc, f"OOM watch on cgroup {self.path}") from exc

    def update_cpuset(self, guest_cpus: str, container_cpus: str) -> None:
        root = self.layout.v1.get("cpuset")
        if root is None:
            return
        try:
            cpuset.update_cpuset_path(root, self.parent, self._bound(), guest_cpus, container_cpus)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise errors.NotFound(f"cgroup {self.path} does not exist") from exc
            raise to_domain(exc, f"update cpuset of cgroup {self.path}") from exc
