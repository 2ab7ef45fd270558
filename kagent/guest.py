"""Guest-level duties the host asks for: details, clock, entropy, memory probe,
volumes, swap, ephemeral mounts, termination logs.

Plain functions that do the work and raise kagent.errors; the RPC handlers in
kagent.service.guest only decode and shape.  Every /sys and /proc read takes a
``root`` (or a path) so that the tests can point it at a fake tree.  Functions
that may block (mount, subprocess, statvfs on a remote filesystem) are sync:
the handlers run them with asyncio.to_thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kagent import __version__
from kagent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
    os_error,
    refuse_nul,
)
from kagent.log import get_logger
from kagent.policy import FEATURE as POLICY_FEATURE
from kagent.runtime import mountinfo, mounts, syscalls

log = get_logger("guest")

SHARED_DIR = "/run/kata-containers/shared/containers/"
RANDOM_DEVICE = "/dev/random"
MEMORY_SYSFS = "sys/devices/system/memory"  # relative to the root parameter
TERMINATION_ANNOTATION = "io.kubernetes.container.terminationMessagePath"
TERMINATION_LOG_MAX = 4096  # Kubernetes caps termination messages at 4 KiB

# linux/random.h: _IOW('R', 0x01, int) and _IO('R', 0x07)
RNDADDTOENTCNT = 0x40045201
RNDRESEEDCRNG = 0x5207
CLOCK_REALTIME = 0

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = fcntl.ioctl  # module attributes, so that tests can put a fake in their place


# --- GetGuestDetails ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestDetails:
    mem_block_size_bytes: int
    support_mem_hotplug_probe: bool
    version: str
    init_daemon: bool
    storage_handlers: list[str]
    supports_seccomp: bool
    extra_features: list[str]


def memory_block_size(root: str = "/") -> int:
    """The memory hot-plug block size (sysfs gives it in hex); 0 without memory hot-plug."""
    path = os.path.join(root, MEMORY_SYSFS, "block_size_bytes")
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise os_error(exc, f"read {path}") from None
    try:
        return int(text, 16)
    except ValueError:
        raise AgentError(f"invalid memory block size {text!r} in {path}") from None


def mem_hotplug_probe_supported(root: str = "/") -> bool:
    return os.path.exists(os.path.join(root, MEMORY_SYSFS, "probe"))


def kernel_has_seccomp(root: str = "/") -> bool:
    """The kernel can filter syscalls (a Seccomp field in /proc/self/status, or actions_avail)."""
    if os.path.exists(os.path.join(root, "proc/sys/kernel/seccomp/actions_avail")):
        return True
    try:
        with open(os.path.join(root, "proc/self/status")) as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def guest_details(want_block_size: bool, want_probe: bool, *, storage_handlers: Iterable[str] = (),
                  root: str = "/") -> GuestDetails:
    # Imported here: as the guest's init the agent has it already, elsewhere start-up need not.
    from kagent import init

    seccomp = kernel_has_seccomp(root)
    return GuestDetails(
        mem_block_size_bytes=memory_block_size(root) if want_block_size else 0,
        support_mem_hotplug_probe=mem_hotplug_probe_supported(root) if want_probe else False,
        version=__version__,
        init_daemon=init.is_init_mode() or os.getpid() == 1,
        storage_handlers=[str(h) for h in storage_handlers],
        supports_seccomp=seccomp,
        # upstream lists its optional build features here, sorted
        extra_features=sorted([POLICY_FEATURE, *(["seccomp"] if seccomp else [])]),
    )


# --- SetGuestDateTime --------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_guest_datetime(sec: int, usec: int) -> None:
    """Set the guest's wall clock (settimeofday semantics: seconds and microseconds)."""
    # An all-default request (Sec=0) is a client bug, not a wish to go back to 1970:
    # refused, unlike upstream, so that no empty request ever moves the clock.
    if sec <= 0:
        raise InvalidArgument(f"SetGuestDateTime: refusing to set the clock to {sec} s after the epoch")
    if not 0 <= usec < 1_000_000:
        raise InvalidArgument(f"SetGuestDateTime: microseconds {usec} not in [0, 999999]")
    ts = _Timespec(sec, usec * 1000)
    if _libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
        err = ctypes.get_errno()
        raise os_error(OSError(err, os.strerror(err)), f"clock_settime({sec}.{usec:06d})")
    log.info("guest clock set", sec=sec, usec=usec)


# --- ReseedRandomDev ---------------------------------------------------------------------------


def reseed_random(data: bytes, device: str = RANDOM_DEVICE) -> None:
    """Mix ``data`` into the kernel's pool, credit it, and reseed the CRNG (as upstream)."""
    if not data:
        raise InvalidArgument("ReseedRandomDev: no data to seed with")
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, f"open {device}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # Upstream credits len(data) bits of entropy: conservative, kept as is.
        _ioctl(fd, RNDADDTOENTCNT, struct.pack("i", min(len(data), 2**31 - 1)))
        _ioctl(fd, RNDRESEEDCRNG, 0)
    except OSError as exc:
        raise os_error(exc, f"reseed {device}") from None
    finally:
        os.close(fd)


# --- MemHotplugByProbe -------------------------------------------------------------------------


def mem_hotplug_by_probe(addresses: Sequence[int], root: str = "/") -> None:
    """Tell the kernel about hot-plugged memory: each address, as 0x%X, to the probe file."""
    probe = os.path.join(root, MEMORY_SYSFS, "probe")
    for addr in addresses:
        text = f"0x{addr:X}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CLOEXEC)  # no O_CREAT: sysfs has it or not
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise os_error(exc, f"write {text} to {probe}") from None
        log.info("memory probed", address=text)


# --- GetVolumeStats ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    total: int
    used: int
    available: int


def volume_stats(path: str) -> tuple[Usage, Usage]:
    """(bytes, inodes) of the filesystem holding ``path``.

    Kubernetes' statfs arithmetic: used counts every block not free, available is
    what an unprivileged writer may still use (f_bavail); upstream's agent reports
    f_bfree as available, which hides the root reserve.
    """
    if not path:
        raise InvalidArgument("GetVolumeStats: empty volume_guest_path")
    refuse_nul(path, "GetVolumeStats: volume_guest_path")
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise os_error(exc, f"statfs {path}") from None
    size = st.f_frsize or st.f_bsize
    space = Usage(st.f_blocks * size, (st.f_blocks - st.f_bfree) * size, st.f_bavail * size)
    inodes = Usage(st.f_files, st.f_files - st.f_ffree, st.f_ffree)
    return space, inodes


# --- ResizeVolume ------------------------------------------------------------------------------

_GROW_TOOLS = {"ext2": "resize2fs", "ext3": "resize2fs", "ext4": "resize2fs", "xfs": "xfs_growfs"}


def _mount_of(path: str, mountinfo_path: str) -> mountinfo.Mount | None:
    """The mount that holds ``path``: the longest mount point above it (the last one wins)."""
    try:
        table = mountinfo.read_file(mountinfo_path)
    except OSError as exc:
        raise os_error(exc, f"read {mountinfo_path}") from None
    best = None
    for m in table:
        mp = m.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = m
    return best


def resize_volume(path: str, *, mountinfo_path: str = "/proc/self/mountinfo",
                  search_path: str | None = None, timeout: float = 300.0) -> str:
    """Grow the filesystem of the block volume mounted at ``path`` to fill its device.

    The host has already grown the device; this only tells the filesystem.  Returns the
    tool that did it.  A filesystem kagent cannot grow, or a missing tool, is UNIMPLEMENTED.
    """
    if not path:
        raise InvalidArgument("ResizeVolume: empty volume_guest_path")
    refuse_nul(path, "ResizeVolume: volume_guest_path")
    if not os.path.exists(path):
        raise NotFound(f"ResizeVolume: {path} does not exist")
    real = os.path.realpath(path)
    m = _mount_of(real, mountinfo_path)
    if m is None:
        raise FailedPrecondition(f"ResizeVolume: no mount holds {path}")
    try:
        is_block = stat.S_ISBLK(os.stat(m.source).st_mode)
    except OSError:
        is_block = False
    if not is_block:
        raise FailedPrecondition(f"ResizeVolume: {path} is on {m.source!r} ({m.fstype}), not a block device")
    tool = _GROW_TOOLS.get(m.fstype)
    if tool is None:
        raise Unimplemented(f"ResizeVolume: growing a {m.fstype} filesystem is not supported by kagent")
    exe = shutil.which(tool, path=search_path)
    if exe is None:
        raise Unimplemented(f"ResizeVolume: {tool} is not installed in the guest, "
                            f"so the {m.fstype} filesystem at {path} cannot be grown")
    # resize2fs takes the device (online resize of a mounted ext4); xfs_growfs the mount point
    target = m.source if tool == "resize2fs" else m.mount_point
    try:
        done = subprocess.run([exe, target], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AgentError(f"ResizeVolume: {tool} {target} did not finish within {timeout:g}s") from None
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise AgentError(f"ResizeVolume: {tool} {target} failed ({done.returncode}): {err}")
    log.info("volume grown", path=path, device=m.source, fstype=m.fstype, tool=tool)
    return tool


# --- AddSwap / AddSwapPath ---------------------------------------------------------------------

_SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")


def check_swap_area(path: str) -> None:
    """Refuse anything swapon(2) should not be given: missing, not a file/device, no mkswap header."""
    if not path:
        raise InvalidArgument("swap: empty path")
    refuse_nul(path, "swap: path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, f"swap: open {path}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(f"swap: {path} is neither a regular file nor a block device")
        page = os.sysconf("SC_PAGE_SIZE")
        header = os.pread(fd, page, 0)
    except OSError as exc:
        raise os_error(exc, f"swap: read {path}") from None
    finally:
        os.close(fd)
    if len(header) < page or header[page - 10:] not in _SWAP_MAGICS:
        raise InvalidArgument(f"swap: {path} is not a swap area (no mkswap signature)")


def swapon(path: str) -> None:
    check_swap_area(path)
    if _libc.swapon(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        raise os_error(OSError(err, os.strerror(err)), f"swapon {path}")
    log.info("swap enabled", path=path)


def pci_path_text(slots: Sequence[int]) -> str:
    """AddSwapRequest.PCIPath ([bridge slot, ..., device slot]) → "01/02"."""
    if not slots:
        raise InvalidArgument("AddSwap: empty PCI path")
    if any(not 0 <= s <= 0x1F for s in slots):
        raise InvalidArgument(f"AddSwap: PCI slot out of range in {list(slots)}")
    return "/".join(f"{s:02x}" for s in slots)


# --- RemoveStaleVirtiofsShareMounts ------------------------------------------------------------


def stat_shared_mounts(base: str = SHARED_DIR, mountinfo_path: str = "/proc/self/mountinfo") -> dict[str, bool]:
    """stat() every mount point under ``base``: virtiofsd drops its stale cache entries then.

    Returns {mount point: stat succeeded}.  A failed stat is the expected case for a stale
    share and is only logged.
    """
    try:
        table = mountinfo.read_file(mountinfo_path)
    except OSError as exc:
        raise os_error(exc, f"read {mountinfo_path}") from None
    prefix = base.rstrip("/") + "/"
    seen: dict[str, bool] = {}
    for m in table:
        if not m.mount_point.startswith(prefix) or m.mount_point in seen:
            continue
        try:
            os.stat(m.mount_point)
            seen[m.mount_point] = True
        except OSError as exc:
            seen[m.mount_point] = False
            log.info("stale share mount", mount_point=m.mount_point, error=str(exc))
    return seen


# --- GetDiagnosticData -------------------------------------------------------------------------


def _spec_parts(spec: Any) -> tuple[Mapping[str, str], list[tuple[str, str]]]:
    """(annotations, [(destination, source)]) of a runtime-spec dict or an oci_pb2.Spec."""
    if isinstance(spec, Mapping):
        annotations = spec.get("annotations") or {}
        pairs = [(m.get("destination", ""), m.get("source", "")) for m in spec.get("mounts") or ()]
    else:
        annotations = dict(spec.Annotations)
        pairs = [(m.destination, m.source) for m in spec.Mounts]
    return annotations, pairs


def termination_log_source(spec: Any, container_id: str) -> str:
    annotations, pairs = _spec_parts(spec)
    dest = annotations.get(TERMINATION_ANNOTATION)
    if not dest:
        raise NotFound(f"container {container_id} has no {TERMINATION_ANNOTATION} annotation")
    for d, source in pairs:
        if os.path.normpath(d) == os.path.normpath(dest) and source:
            return source
    raise NotFound(f"container {container_id} has no mount at its termination message path {dest}")


def read_termination_log(source: str) -> str:
    """Up to 4 KiB of the termination log at ``source``; "" while it does not exist.

    Opened without following a final symlink and without blocking, and only a regular
    file is read: the file's name comes from the host and its content from the workload.
    """
    refuse_nul(source, "termination log")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionDenied(f"termination log {source} is a symlink") from None
        raise os_error(exc, f"open termination log {source}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"termination log {source} is not a regular file")
        return os.read(fd, TERMINATION_LOG_MAX).decode(errors="replace")
    finally:
        os.close(fd)


def termination_log(agent: object, container_id: str) -> str:
    containers = getattr(getattr(agent, "sandbox", None), "containers", None)
    if containers is None:
        raise NotFound(f"GetDiagnosticData: no container {container_id!r} (no sandbox)")
    container = containers.get(container_id)
    if container is None:
        raise NotFound(f"GetDiagnosticData: no container {container_id!r}")
    spec = getattr(container, "spec", None)
    if spec is None:
        raise NotFound(f"GetDiagnosticData: container {container_id} has no OCI spec")
    return read_termination_log(termination_log_source(spec, container_id))


def diagnostic_data(agent: object, log_type: str, container_id: str) -> str:
    if log_type != "termination_log":
        raise InvalidArgument(f"GetDiagnosticData: unsupported log_type {log_type!r} "
                              "(only \"termination_log\")")
    return termination_log(agent, container_id)


# --- UpdateEphemeralMounts ---------------------------------------------------------------------


@dataclass(frozen=True)
class EphemeralMount:
    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str


def update_ephemeral_mounts(storages: Sequence[EphemeralMount]) -> None:
    """mkdir and (re)mount each ephemeral (tmpfs) storage with its options, fsgid= dropped.

    Every storage is checked before anything is mounted, so a bad request changes nothing.
    """
    for s in storages:
        for value, name in ((s.mount_point, "mount point"), (s.source, "source"), (s.fstype, "fstype"),
                            *((o, "option") for o in s.options)):
            refuse_nul(value, f"UpdateEphemeralMounts: {name}")
        if s.driver != "ephemeral":
            raise InvalidArgument(f"UpdateEphemeralMounts: driver {s.driver!r} of {s.mount_point!r} "
                                  "is not supported (only \"ephemeral\")")
        if not os.path.isabs(s.mount_point):
            raise InvalidArgument(f"UpdateEphemeralMounts: mount point {s.mount_point!r} is not absolute")
    for s in storages:
        try:
            os.makedirs(s.mount_point, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"mkdir {s.mount_point}") from None
        if not s.options:
            continue  # as upstream: nothing to change
        # fsgid= was applied when the storage was first mounted; the kernel does not know it
        opts = mounts.parse_options([o for o in s.options if not o.startswith("fsgid=")])
        try:
            syscalls.mount(s.source or "tmpfs", s.mount_point, s.fstype or "tmpfs", opts.flags, opts.data_str)
        except OSError as exc:
            raise os_error(exc, f"mount {s.fstype or 'tmpfs'} at {s.mount_point}") from None
        log.info("ephemeral storage mounted", mount_point=s.mount_point, options=",".join(s.options))
