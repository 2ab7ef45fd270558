"""The cgroup v2 driver: one unified hierarchy.

Creation enables, level by level from the agent's parent down to the pod,
every controller the level offers (cgroup.controllers → cgroup.subtree_control),
so the container's cgroup gets the interface files.  A controller that is not
offered is not an error: its settings are skipped with a warning (here the
machine's cgroup2 offers only hugetlb at the top, and nothing below).

Conversions from the OCI (v1-shaped) values, as upstream and runc:
cpu.weight = 1 + ((shares - 2) * 9999) / 262142; cpu.max = "quota period"
("max" for no quota; a missing quota keeps the current one); memory.swap.max =
swap - limit (OCI swap is memory+swap); io.weight from the blkio weight
(1 + (w - 10) * 9999 / 990) unless io.bfq.weight exists, which takes the
blkio range as is; throttle rates go to io.max as rbps/wbps/riops/wiops
(0 = "max").  Devices: a BPF program (bpfdev.py).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from typing import Any

from kagent import errors

from . import bpfdev, cpuset, fswrite, stats
from .errors import to_domain
from .manager import FREEZING, FROZEN, THAWED, Manager
from .oom import V2OomWatch
from .paths import ancestors
from .resources import (
    blkio_weight_to_io_weight,
    device_rules,
    hugepage_size,
    max_text,
    num,
    section,
    shares_to_weight,
    swap_to_v2,
)
from .stats import parse_flat

__all__ = ["V2Manager"]

Writes = list[tuple[str, str]]

# the controller each interface-file prefix belongs to
_CONTROLLER = {"cpu": "cpu", "cpuset": "cpuset", "memory": "memory", "io": "io", "pids": "pids",
               "hugetlb": "hugetlb", "rdma": "rdma", "misc": "misc"}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


class V2Manager(Manager):
    driver = "v2"

    @property
    def root(self) -> str:
        if not self.layout.unified:
            raise errors.FailedPrecondition("no cgroup2 hierarchy is mounted")
        return self.layout.unified

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self._bound())

    def dirs(self) -> list[str]:
        return [self.dir]

    def _procs_file(self) -> str:
        return os.path.join(self.dir, "cgroup.procs")

    # -- creation ----------------------------------------------------------------------------------

    def _create(self, resources: Mapping[str, Any] | None = None) -> None:
        rel = self._bound()
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            try:
                os.mkdir(os.path.join(self.root, "/".join(parts[:depth])), 0o755)
            except FileExistsError:
                pass
        for level in ancestors(rel, self.parent):
            self._enable_controllers(os.path.join(self.root, level))

    def _enable_controllers(self, directory: str) -> None:
        offered = _read(os.path.join(directory, "cgroup.controllers")).split()
        enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
        control = os.path.join(directory, "cgroup.subtree_control")
        for name in offered:
            if name in enabled:
                continue
            try:  # one at a time: one refusal must not cost the others
                fswrite.write_batch([(control, f"+{name}")])
            except OSError as exc:
                self._log.warning("cannot enable cgroup controller", controller=name, error=str(exc))

    # -- resources ---------------------------------------------------------------------------------

    def _offered(self) -> set[str]:
        return set(_read(os.path.join(self.dir, "cgroup.controllers")).split())

    def set(self, resources: Mapping[str, Any], update: bool = False) -> list[str]:
        self._bound()
        resources = resources or {}
        warnings: list[str] = []
        writes: Writes = []
        offered = self._offered()

        def file(controller: str, name: str, what: str) -> str | None:
            path = os.path.join(self.dir, name)
            if controller not in offered:
                warnings.append(f"{what}: the {controller} controller is not enabled for this cgroup; skipped")
                return None
            if not os.path.exists(path):
                warnings.append(f"{what}: {name} does not exist on this kernel; skipped")
                return None
            return path

        self._cpu(section(resources, "cpu"), writes, warnings, file)
        self._memory(section(resources, "memory"), writes, warnings, file)
        if "pids" in resources:
            limit = num(section(resources, "pids"), "limit")
            if (path := file("pids", "pids.max", "pids.limit")):
                writes.append((path, str(limit) if limit is not None and limit > 0 else "max"))
        self._io(section(resources, "blockIO"), writes, warnings, file)
        for limit in resources.get("hugepageLimits") or []:
            size = hugepage_size(limit)
            if (path := file("hugetlb", f"hugetlb.{size}.max", f"hugepageLimits {size}")):
                writes.append((path, str(int(limit.get("limit", 0)))))
        if section(resources, "network"):
            warnings.append("network classID/priorities have no cgroup v2 equivalent; skipped")
        if resources.get("rdma"):
            warnings.append("rdma limits are not supported; skipped")
        for key, value in (resources.get("unified") or {}).items():
            if "/" in key or key.startswith(".") or "." not in key:
                raise errors.InvalidArgument(f"resources.unified: invalid cgroup file name {key!r}")
            controller = _CONTROLLER.get(key.split(".", 1)[0])
            if controller is not None and controller not in offered:
                raise errors.InvalidArgument(f"resources.unified: {key}: the {controller} controller is not enabled")
            writes.append((os.path.join(self.dir, key), str(value)))
        try:
            fswrite.write_batch(writes)
            if not update or resources.get("devices"):
                rules = device_rules(resources.get("devices"), defaults=self.default_devices)
                if rules:
                    bpfdev.apply(self.dir, rules)
        except OSError as exc:
            raise to_domain(exc, f"set resources of cgroup {self.path}") from exc
        for w in warnings:
            self._log.warning("cgroup setting skipped", reason=w)
        return warnings

    def _cpu(self, cpu: Mapping[str, Any], writes: Writes, warnings: list[str], file) -> None:
        for key in ("cpus", "mems"):
            if (value := cpu.get(key)):
                cpuset.parse_list(value)
                if (path := file("cpuset", f"cpuset.{key}", f"cpu.{key}")):
                    writes.append((path, value))
        if (shares := num(cpu, "shares")) is not None:
            if (path := file("cpu", "cpu.weight", "cpu.shares")):
                writes.append((path, str(shares_to_weight(shares))))
        quota, period = num(cpu, "quota"), num(cpu, "period")
        if quota is not None or period is not None:
            if (path := file("cpu", "cpu.max", "cpu.quota/period")):
                current = _read(path).split() or ["max", "100000"]
                quota_text = current[0] if quota is None else max_text(quota)
                writes.append((path, f"{quota_text} {period}" if period is not None else quota_text))
        if (burst := num(cpu, "burst")) is not None and (path := file("cpu", "cpu.max.burst", "cpu.burst")):
            writes.append((path, str(burst)))
        if cpu.get("idle") is not None and (path := file("cpu", "cpu.idle", "cpu.idle")):
            writes.append((path, str(int(cpu["idle"]))))
        if num(cpu, "realtimeRuntime") is not None or num(cpu, "realtimePeriod") is not None:
            warnings.append("cpu.realtimeRuntime/realtimePeriod: no cgroup v2 equivalent; skipped")

    def _memory(self, mem: Mapping[str, Any], writes: Writes, warnings: list[str], file) -> None:
        if not mem:
            return
        limit, swap = num(mem, "limit"), num(mem, "swap")
        if limit is not None and (path := file("memory", "memory.max", "memory.limit")):
            writes.append((path, max_text(limit)))
        swap_v2 = swap_to_v2(swap, limit)
        if swap_v2 is not None and (path := file("memory", "memory.swap.max", "memory.swap")):
            writes.append((path, max_text(swap_v2)))
        if (value := num(mem, "reservation")) is not None and (path := file("memory", "memory.low", "memory.reservation")):
            writes.append((path, max_text(value)))
        if num(mem, "kernel") is not None:
            self._log.debug("memory.kernel ignored (no kernel memory limit on cgroup v2)")
        if num(mem, "kernelTCP") is not None:
            warnings.append("memory.kernelTCP: no cgroup v2 equivalent; skipped")
        if mem.get("swappiness") is not None:
            swappiness = mem["swappiness"]
            if isinstance(swappiness, bool) or not isinstance(swappiness, int) or not 0 <= swappiness <= 100:
                raise errors.InvalidArgument(f"resources: memory.swappiness {swappiness!r} is not in 0-100")
            warnings.append("memory.swappiness: no per-cgroup swappiness on cgroup v2; skipped")
        if mem.get("disableOOMKiller"):
            warnings.append("memory.disableOOMKiller: cgroup v2 cannot disable the OOM killer; skipped")

    def _io(self, blkio: Mapping[str, Any], writes: Writes, warnings: list[str], file) -> None:
        if not blkio:
            return
        bfq = os.path.exists(os.path.join(self.dir, "io.bfq.weight"))
        if (weight := num(blkio, "weight")) is not None:
            if bfq:
                writes.append((os.path.join(self.dir, "io.bfq.weight"), str(weight)))
            elif (path := file("io", "io.weight", "blockIO.weight")):
                writes.append((path, f"default {blkio_weight_to_io_weight(weight)}"))
        if num(blkio, "leafWeight") is not None:
            warnings.append("blockIO.leafWeight: no cgroup v2 equivalent; skipped")
        for dev in blkio.get("weightDevice") or []:
            if (weight := num(dev, "weight")) is None:
                continue
            devnum = f"{int(dev['major'])}:{int(dev['minor'])}"
            if bfq:
                writes.append((os.path.join(self.dir, "io.bfq.weight"), f"{devnum} {weight}"))
            elif (path := file("io", "io.weight", "blockIO.weightDevice")):
                writes.append((path, f"{devnum} {blkio_weight_to_io_weight(weight)}"))
        for key, field in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                           ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):
            for dev in blkio.get(key) or []:
                if (path := file("io", "io.max", f"blockIO.{key}")):
                    rate = int(dev.get("rate", 0))
                    writes.append((path, f"{int(dev['major'])}:{int(dev['minor'])} {field}={rate or 'max'}"))

    # -- stats, freezer, kill, OOM, cpuset ----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        sizes: list[str] = []
        try:
            sizes = sorted(n.split(".")[1] for n in os.listdir(self.dir)
                           if n.startswith("hugetlb.") and n.endswith(".max") and n.count(".") == 2)
        except FileNotFoundError:
            raise errors.NotFound(f"cgroup {self.path} does not exist") from None
        names = stats.v2_files(sizes)
        try:
            contents = fswrite.read_batch([os.path.join(self.dir, n) for n in names])
        except OSError as exc:
            raise to_domain(exc, f"stats of cgroup {self.path}") from exc
        return stats.v2_stats(dict(zip(names, contents, strict=True)), sizes)

    def _write_freeze(self, frozen: bool) -> None:
        fswrite.write_batch([(os.path.join(self.dir, "cgroup.freeze"), "1" if frozen else "0")])

    def state(self) -> str:
        want = _read(os.path.join(self.dir, "cgroup.freeze"))
        if not want:
            if not os.path.isdir(self.dir):
                raise errors.NotFound(f"cgroup {self.path} does not exist")
            raise errors.FailedPrecondition("this kernel has no cgroup.freeze (cgroup v2 freezer needs Linux 5.2)")
        if want != "1":
            return THAWED
        frozen = parse_flat(_read(os.path.join(self.dir, "cgroup.events"))).get("frozen", 0)
        return FROZEN if frozen == 1 else FREEZING

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """SIGKILL goes through cgroup.kill when the kernel has it (one write, no race with
        forks); other signals freeze → signal → thaw."""
        kill_file = os.path.join(self.dir, "cgroup.kill")
        if sig == signal.SIGKILL and os.path.exists(kill_file):
            count = len(self.pids())
            try:
                fswrite.write_batch([(kill_file, "1")])
            except OSError as exc:
                raise to_domain(exc, f"kill cgroup {self.path}") from exc
            return count
        return super().kill_all(sig)

    def _oom_counter_file(self) -> str | None:
        return os.path.join(self.dir, "memory.events")

    def oom_watch(self) -> V2OomWatch:
        if not os.path.exists(os.path.join(self.dir, "memory.events")):
            raise errors.FailedPrecondition(
                f"cgroup {self.path} has no memory.events (memory controller not enabled): no OOM events")
        try:
            return V2OomWatch(self.dir)
        except OSError as exc:
            raise to_domain(exc, f"OOM watch on cgroup {self.path}") from exc

    def update_cpuset(self, guest_cpus: str, container_cpus: str) -> None:
        # cpuset.cpus exists only where the cpuset controller is enabled; without it there is nothing to widen
        if not os.path.exists(os.path.join(self.dir, "cpuset.cpus")):
            self._log.debug("no cpuset controller on this cgroup; cpuset update skipped")
            return
        try:
            cpuset.update_cpuset_path(self.root, self.parent, self._bound(), guest_cpus, container_cpus)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise errors.NotFound(f"a cpuset.cpus on the path of cgroup {self.path} is missing") from exc
            raise to_domain(exc, f"update cpuset of cgroup {self.path}") from exc
