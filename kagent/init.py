"""PID-1 duties in the guest (upstream main.rs ``init_agent_as_init``, mount.rs ``general_mount``).

When kagent is the guest's init (``os.getpid() == 1``) the work is split in two processes::

    PID 1   kagent-init: mounts, modules, cgroups, /dev/ptmx, hostname, lo; then only reaps
     └── kagent (supervisor)  forked by boot(); everything else, as when not init

PID 1 reaps every orphan with a plain blocking ``wait()`` and does nothing else.
The supervisor is not a subreaper, so its own children (the zygote, and commands
that threads run with subprocess.run) stay its own and their status is never
stolen, and uvloop keeps SIGCHLD to itself.  Orphans re-parent to PID 1.

When the supervisor exits with status 0 (DestroySandbox, SIGTERM) PID 1 syncs and
powers the VM off.  When it dies any other way PID 1 syncs and exits on purpose:
the kernel panics ("Attempted to kill init"), which pvpanic reports to the host
as a failure.  PID 1 never exits for any other reason: an unexpected error in its
loop is logged and the loop goes on.

``prepare()`` runs before the configuration is read (it needs /proc/cmdline);
``boot(config)`` does the rest and forks.  Every step takes ``root`` so that
the tests can run it in private namespaces on a directory of their own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import platform
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from kagent import log as klog
from kagent.runtime import mountinfo, syscalls
from kagent.runtime.syscalls import MS_NODEV, MS_NOEXEC, MS_NOSUID

if TYPE_CHECKING:
    from kagent.config import AgentConfig

__all__ = ["BASE_MOUNTS", "Mount", "Report", "boot", "is_init_mode", "load_modules", "main",
           "module_plan", "power_off", "prepare"]

_log = klog.get_logger("init")

PATH = "/bin:/sbin:/usr/bin:/usr/sbin"
MODULES_LOAD_DIR = "etc/modules-load.d"  # systemd's format: one module name a line, # comments


@dataclass(frozen=True)
class Mount:
    source: str
    target: str  # relative to root
    fstype: str
    flags: int
    data: str | None = None
    required: bool = True  # a failure of an optional mount is only logged


# Upstream's INIT_ROOTFS_MOUNTS, in order.  devpts gets ptmxmode=0666 because
# /dev/ptmx becomes a link to pts/ptmx, which is mode 000 by default.
BASE_MOUNTS: tuple[Mount, ...] = (
    Mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("dev", "dev", "devtmpfs", MS_NOSUID, required=False),
    Mount("tmpfs", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV),
    Mount("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    Mount("tmpfs", "run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)


@dataclass
class Report:
    """What prepare() did, logged by boot() once logging is set up."""

    mounted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per step


_init_mode = False


def is_init_mode() -> bool:
    """True in the supervisor that boot() forked (for GetGuestDetails.init_daemon)."""
    return _init_mode


# --- mounts --------------------------------------------------------------------------------


def _mounted(proc_root: str) -> set[tuple[str, str]]:
    """(mount point, fstype) pairs; empty before any /proc exists."""
    for path in (os.path.join(proc_root, "proc/self/mountinfo"), "/proc/self/mountinfo"):
        try:
            return {(m.mount_point, m.fstype) for m in mountinfo.read_file(path)}
        except OSError:
            continue
    return set()


def mount_base(root: str = "/", mounts: Sequence[Mount] = BASE_MOUNTS, report: Report | None = None) -> Report:
    """Mount each of ``mounts`` under ``root`` unless that fstype is mounted there already."""
    report = report or Report()
    for m in mounts:
        target = os.path.normpath(os.path.join(root, m.target))
        if (target, m.fstype) in _mounted(root):
            report.skipped.append(target)
            continue
        try:
            os.makedirs(target, mode=0o755, exist_ok=True)
            syscalls.mount(m.source, target, m.fstype, m.flags, m.data)
            report.mounted.append(target)
        except OSError as exc:
            report.problems.append(f"mount {m.fstype} on {target}: {exc}")
    return report


# --- kernel modules ------------------------------------------------------------------------

_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273, "arm64": 273, "s390x": 344, "ppc64le": 353}


def _modname(name: str) -> str:
    base = os.path.basename(name)
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep → module name → [its file, then its dependencies' files as listed]."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep:
            out[_modname(path)] = [path.strip(), *deps.split()]
    return out


def module_plan(names: Iterable[str], deps: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(files in load order, unknown names).  modules.dep lists a module's whole dependency
    chain with the deepest last, so each chain is loaded from its end (as modprobe does)."""
    order: list[str] = []
    unknown: list[str] = []
    for name in names:
        entry = deps.get(_modname(name))
        if entry is None:
            unknown.append(name)
            continue
        for path in [*reversed(entry[1:]), entry[0]]:
            if path not in order:
                order.append(path)
    return order, unknown


def wanted_modules(root: str = "/") -> list[str]:
    names: list[str] = []
    for conf in sorted(glob.glob(os.path.join(root, MODULES_LOAD_DIR, "*.conf"))):
        try:
            with open(conf) as f:
                for line in f:
                    word = line.split("#", 1)[0].strip()
                    if word and word not in names:
                        names.append(word)
        except OSError:
            continue
    return names


def _finit_module(path: str) -> None:
    nr = _SYS_FINIT_MODULE.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"finit_module: no syscall number for {platform.machine()}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        if libc.syscall(ctypes.c_long(nr), ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_int(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"finit_module({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def load_modules(names: Sequence[str] | None = None, root: str = "/", release: str | None = None,
                 report: Report | None = None) -> Report:
    """Load ``names`` (default: etc/modules-load.d/*.conf) and their dependencies."""
    report = report or Report()
    names = wanted_modules(root) if names is None else list(names)
    if not names:
        return report
    moddir = os.path.join(root, "lib/modules", release or os.uname().release)
    try:
        with open(os.path.join(moddir, "modules.dep")) as f:
            deps = parse_modules_dep(f.read())
    except OSError as exc:
        report.problems.append(f"modules: {exc}")
        return report
    order, unknown = module_plan(names, deps)
    report.problems += [f"module {n}: not in {moddir}/modules.dep" for n in unknown]
    for rel in order:
        try:
            _finit_module(os.path.join(moddir, rel))
            report.modules.append(_modname(rel))
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # built in, or loaded already
                report.problems.append(str(exc))
    return report


# --- the rest of init ----------------------------------------------------------------------

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")


def link_up(name: str = "lo") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        raw = fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0))
        flags = _IFREQ.unpack(raw)[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | _IFF_UP))


def link_ptmx(root: str = "/") -> None:
    """/dev/ptmx → pts/ptmx, so ptys come from the devpts instance mounted on /dev/pts."""
    ptmx = os.path.join(root, "dev/ptmx")
    if os.path.islink(ptmx) and os.readlink(ptmx) == "pts/ptmx":
        return
    if os.path.lexists(ptmx):
        os.unlink(ptmx)
    os.symlink("pts/ptmx", ptmx)


def set_hostname(root: str = "/") -> str | None:
    try:
        with open(os.path.join(root, "etc/hostname")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    if name:
        syscalls.sethostname(name)
    return name or None


def new_session(fd: int = 0) -> bool:
    """setsid(); True when stdin (the kernel's /dev/console) is a tty.

    Upstream's PID 1 also makes the console its controlling tty, because its serial debug
    shell runs in PID 1's session.  kagent's debug shell is a session leader of its own
    that takes the console as *its* controlling tty (job control, ^C), which fails
    (EPERM) while another session holds it: so PID 1 leaves the console free."""
    try:
        os.setsid()
    except PermissionError:
        pass  # already a session leader
    return os.isatty(fd)


def mount_cgroups(config: AgentConfig, root: str = "/") -> list[str]:
    target = os.path.join(root, "sys/fs/cgroup")
    if any(mp == target or mp.startswith(target + "/") for mp, _ in _mounted(root)):
        return []  # someone (a test, an image's own init) did it already
    from kagent.cgroups import mount as cgmount

    return cgmount.mount_cgroups(config.unified_cgroup_hierarchy, root=target,
                                 proc_cgroups=os.path.join(root, "proc/cgroups"))


# --- power --------------------------------------------------------------------------------

_RB_POWER_OFF = 0x4321FEDC


def power_off() -> NoReturn:
    """sync, then reboot(RB_POWER_OFF).  Only PID 1 may call it (in a PID namespace other
    than the machine's, the kernel turns it into the end of that namespace)."""
    if os.getpid() != 1:
        raise RuntimeError("power_off() is for PID 1 only")
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(ctypes.c_int(_RB_POWER_OFF))
    _log.critical("reboot(RB_POWER_OFF) failed; exiting init", error=os.strerror(ctypes.get_errno()))
    os._exit(1)  # the kernel panics: the VM stops either way


def _panic(reason: str) -> NoReturn:
    _log.critical("init exits: the kernel panics on purpose", reason=reason)
    os.sync()
    os._exit(1)


# --- PID 1 ----------------------------------------------------------------------------------


def _uptime(root: str = "/") -> float | None:
    try:
        with open(os.path.join(root, "proc/uptime")) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _describe(status: int) -> tuple[int, str]:
    code = os.waitstatus_to_exitcode(status)
    return code, (f"signal {-code}" if code < 0 else f"exit {code}")


def reap_forever(agent_pid: int) -> NoReturn:
    """PID 1's loop: reap everything; the agent's end powers off (0) or panics (else)."""
    orphans = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            _panic("no children left (the agent is gone)")
        except BaseException as exc:  # noqa: BLE001 - PID 1 must not die of a bug
            _log.error("reaper", error=repr(exc))
            continue
        try:
            if pid != agent_pid:
                orphans += 1
                _log.debug("orphan reaped", pid=pid, status=_describe(status)[1], orphans=orphans)
                continue
            code, how = _describe(status)
            if code == 0:
                _log.info("agent exited: powering off", status=how)
                power_off()
            _panic(f"agent died ({how})")
        except BaseException as exc:  # noqa: BLE001
            _log.error("reaper", error=repr(exc))


def prepare(root: str = "/", mounts: Sequence[Mount] = BASE_MOUNTS, modules: Sequence[str] | None = None) -> Report:
    """Before the configuration: the base mounts, then the kernel modules the image lists."""
    t0 = time.monotonic()
    report = mount_base(root, mounts)
    t1 = time.monotonic()
    load_modules(modules, root=root, report=report)
    report.seconds.update(mounts=round(t1 - t0, 3), modules=round(time.monotonic() - t1, 3))
    os.environ["PATH"] = PATH
    return report


def boot(config: AgentConfig, report: Report | None = None, root: str = "/",
         cgroups: bool = True) -> None:
    """The rest of init; then fork.  Returns only in the supervisor; PID 1 reaps forever."""
    global _init_mode
    report = report or Report()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("ptmx", lambda: link_ptmx(root)),
        ("console", new_session),
        ("hostname", lambda: set_hostname(root)),
        ("lo up", link_up),
    ]
    if cgroups:
        steps.insert(0, ("cgroups", lambda: mount_cgroups(config, root)))
    done: dict[str, object] = {}
    for name, step in steps:
        t0 = time.monotonic()
        try:
            done[name] = step()
        except Exception as exc:  # noqa: BLE001 - a failed step is reported, init goes on
            report.problems.append(f"{name}: {exc}")
        report.seconds[name] = round(time.monotonic() - t0, 3)
    _log.info("init", uptime=_uptime(root), mounted=report.mounted, already_mounted=report.skipped,
              modules=report.modules, cgroups=done.get("cgroups"), hostname=done.get("hostname"),
              console=done.get("console"), seconds=report.seconds)
    for problem in report.problems:
        _log.warning("init", problem=problem)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        _panic(f"cannot fork the agent: {exc}")
    if pid == 0:
        os.setsid()  # a session of its own: the console's job control never reaches the agent
        _init_mode = True
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Python's default handler would raise here
    try:
        with open("/proc/self/comm", "w") as f:  # "kagent-init" in ps, not "python3.11"
            f.write("kagent-init")
    except OSError:
        pass
    reap_forever(pid)


def main(argv: list[str] | None = None) -> int:
    """The guest's init: PID-1 duties, then the agent (kagent's ordinary main) in a child.

    Arguments from the kernel command line are ignored in init mode, as upstream;
    options come from ``agent.*`` on the command line (and agent.config_file)."""
    if os.getpid() != 1:
        raise RuntimeError("kagent.init.main() is the guest's init: run it as PID 1")
    report = prepare()
    from kagent import config as kconfig

    cfg = kconfig.load()
    klog.setup(cfg.log_level)
    boot(cfg, report)
    from kagent.__main__ import main as agent_main

    return agent_main([])
