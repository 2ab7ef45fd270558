"""Process attributes from ``process``: stdio and tty, rlimits, oom_score_adj, LSM labels,
no_new_privs, user and capabilities, cwd, umask, environment, and the exec itself.

Everything here runs in the forked child, in the container's namespaces, after
pivot_root.  ``apply()`` does all of it in runc's order and returns what the
final ``execute()`` needs; between the two the init reports "ready" and waits
for StartContainer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from . import capabilities, syscalls, users
from .errors import (
    BAD_EXEC,
    NO_SUCH_PATH,
    InvalidSpec,
    SetupError,
    check_no_nul,
    check_range,
    step,
)
from .seccomp import Filter
from .stdio import ChildStdio, open_console

Warn = Callable[[str], None]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

RLIMITS = {
    name: getattr(resource, name)
    for name in (
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    )
    if hasattr(resource, name)
}


RLIM64_INFINITY = 2**64 - 1  # OCI's (and the kernel's) "unlimited"


def check(process: dict) -> None:
    """Refuse, before any fork, numbers the kernel's types cannot hold and strings C cannot
    (create and exec)."""
    check_no_nul(process, "process")
    size = process.get("consoleSize") or {}
    for key in ("height", "width"):
        check_range(f"process.consoleSize.{key}", size.get(key, 0), 0, 0xFFFF)  # winsize: ushort
    for rl in process.get("rlimits") or []:
        kind = rl.get("type")
        if kind not in RLIMITS:
            raise InvalidSpec("rlimit", f"rlimit: unknown type {kind!r}")
        soft = check_range(f"process.rlimits {kind} soft", rl.get("soft", 0), 0, RLIM64_INFINITY)
        hard = check_range(f"process.rlimits {kind} hard", rl.get("hard", 0), 0, RLIM64_INFINITY)
        if soft > hard:
            raise InvalidSpec("spec", f"spec: process.rlimits {kind}: soft {soft} is above hard {hard}")
    if process.get("oomScoreAdj") is not None:
        check_range("process.oomScoreAdj", process["oomScoreAdj"], -1000, 1000)
    user = process.get("user") or {}
    for key in ("uid", "gid"):
        check_range(f"process.user.{key}", user.get(key, 0), 0, users.ID_MAX)
    for gid in user.get("additionalGids") or []:
        check_range("process.user.additionalGids", gid, 0, users.ID_MAX)
    if user.get("umask") is not None:
        check_range("process.user.umask", user["umask"], 0, 0o777)


def _rlim(value: int) -> int:
    """A uint64 limit as resource.setrlimit takes it (a C long: the same 64 bits)."""
    return value - 2**64 if value >= 2**63 else value


@dataclass
class Exec:
    """What execve needs, resolved before the init reports ready."""

    path: str
    args: list[str]
    env: dict[str, str]


def set_oom_score_adj(process: dict) -> None:
    """Before any user namespace and before the capabilities are dropped: lowering the score
    needs CAP_SYS_RESOURCE in the initial user namespace."""
    value = process.get("oomScoreAdj")
    if value is None:
        return
    with (
        step(f"set oom_score_adj {value}", "/proc/self/oom_score_adj"),
        open("/proc/self/oom_score_adj", "w") as f,
    ):
        f.write(str(int(value)))


def make_console(stdio: ChildStdio, send: Callable[[int], None] | None) -> None:
    """Create the terminal from the container's /dev/ptmx and hand the master to the worker."""
    if not stdio.wants_console:
        return
    if send is None:
        raise SetupError("create console", "create console: no way to hand the pty master to the worker")
    with step("create console", "/dev/ptmx"):
        master, slave = open_console()
    try:
        send(master)
    finally:
        os.close(master)
    stdio.stdin = stdio.stdout = stdio.stderr = slave


def setup_stdio(stdio: ChildStdio, process: dict) -> None:
    """Put the child's ends on 0/1/2; with a terminal, make it the controlling tty."""
    with step("set up stdio"):
        # Copy the ends above 2 first: one of them may itself be 0, 1 or 2 (a worker with
        # closed stdio), and dup2 onto itself would neither move it nor clear close-on-exec.
        high = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            for fd in (stdio.stdin, stdio.stdout, stdio.stderr)
        ]
        for target, fd in enumerate(high):
            os.dup2(fd, target)  # the copy on 0/1/2 is inheritable; the rest closes at exec
        for fd in high:
            os.close(fd)
        os.setsid()  # a session of its own: the worker's process group never signals it
        if stdio.terminal:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            size = process.get("consoleSize")
            if size:
                winsize = struct.pack(
                    "HHHH", int(size.get("height", 0)), int(size.get("width", 0)), 0, 0
                )
                fcntl.ioctl(0, termios.TIOCSWINSZ, winsize)


def set_rlimits(process: dict) -> None:
    """After check(): known types, uint64 values."""
    for rl in process.get("rlimits") or []:
        kind = rl["type"]
        soft, hard = rl.get("soft", 0), rl.get("hard", 0)
        with step(f"set {kind} soft={soft} hard={hard}"):
            try:
                resource.setrlimit(RLIMITS[kind], (_rlim(soft), _rlim(hard)))
            except ValueError as exc:  # how the resource module reports EPERM (check() ruled out EINVAL)
                raise PermissionError(errno.EPERM, str(exc)) from exc


def set_lsm_labels(process: dict, warn: Warn) -> None:
    """AppArmor profile / SELinux label for the exec; skipped with a warning without kernel support."""
    profile = process.get("apparmorProfile")
    if profile:
        if not os.path.isdir("/sys/kernel/security/apparmor"):
            warn(f"apparmor profile {profile!r} requested but the kernel has no AppArmor: skipped")
        else:
            attr = "/proc/self/attr/apparmor/exec"
            attr = attr if os.path.exists(attr) else "/proc/self/attr/exec"
            with step(f"set apparmor profile {profile!r}", attr), open(attr, "w") as f:
                f.write(f"exec {profile}")
    label = process.get("selinuxLabel")
    if label:
        if not os.path.isdir("/sys/fs/selinux"):
            warn(f"selinux label {label!r} requested but the kernel has no SELinux: skipped")
        else:
            with (
                step(f"set selinux label {label!r}", "/proc/self/attr/exec"),
                open("/proc/self/attr/exec", "w") as f,
            ):
                f.write(label)


def find_executable(name: str, env: dict[str, str]) -> str:
    """PATH lookup in the container's environment (execvpe semantics), before the init
    reports ready: a program that is not there fails CreateContainer or ExecProcess, with
    execve's errno, rather than StartContainer or nothing at all."""
    if not name:
        raise InvalidSpec("exec", "exec: process.args[0] is empty")
    if "/" in name:
        try:
            st = os.stat(name)
        except OSError as exc:
            raise _cannot_exec(name, exc.errno or errno.ENOENT) from exc
        if not stat.S_ISREG(st.st_mode) or not os.access(name, os.X_OK):
            raise _cannot_exec(name, errno.EACCES)  # what execve says of a directory, too
        return name
    search = env.get("PATH", DEFAULT_PATH)
    for d in search.split(":"):
        path = os.path.join(d or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise InvalidSpec(
        "exec",
        f"exec {name}: executable file not found in $PATH ({search})",
        path=name,
        errno=errno.ENOENT,
    )


def _cannot_exec(name: str, err: int) -> InvalidSpec:
    return InvalidSpec("exec", f"exec {name}: [Errno {err}] {os.strerror(err)}", path=name, errno=err)


def environment(process: dict, ident: users.Identity) -> dict[str, str]:
    env = {}
    for item in process.get("env") or []:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    env.setdefault("HOME", ident.home)
    return env


def apply(process: dict, stdio: ChildStdio, flt: Filter | None, warn: Warn,
          console: Callable[[int], None] | None = None) -> Exec:
    """All attributes, in order; the seccomp filter is loaded here unless noNewPrivileges defers it."""
    ident = users.resolve(process.get("user"), process.get("stringUser"))
    make_console(stdio, console)
    setup_stdio(stdio, process)
    set_rlimits(process)
    set_lsm_labels(process, warn)
    nnp = bool(process.get("noNewPrivileges"))
    if nnp:
        with step("set no_new_privs"):
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    elif flt is not None:
        flt.load()  # needs CAP_SYS_ADMIN without no_new_privs: before the drop below
    caps = capabilities.from_spec(process.get("capabilities"), warn)
    if caps is not None:
        capabilities.drop_bounding(caps)
    cwd = process.get("cwd") or "/"
    try:
        os.chdir(cwd)  # as root first: the user may not be able to reach it, root can
        cwd_done = True
    except OSError:
        cwd_done = False
    _own_stdio(stdio, ident)
    with step("keep capabilities across setuid"):
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 1)
    users.switch(ident)
    with step("clear keep-capabilities"):
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 0)
    if caps is not None:
        capabilities.apply(caps)
    if not cwd_done:
        with step(f"chdir {cwd}", cwd, invalid=NO_SUCH_PATH):
            os.chdir(cwd)
    umask = (process.get("user") or {}).get("umask")
    os.umask(0o022 if umask is None else int(umask))
    env = environment(process, ident)
    args = list(process.get("args") or [])
    return Exec(find_executable(args[0] if args else "", env), args, env)


def _own_stdio(stdio: ChildStdio, ident: users.Identity) -> None:
    """Give the stdio pipes to the user, so /dev/stdout (/proc/self/fd/1) can be reopened."""
    if ident.uid == 0 and ident.gid == 0:
        return
    for fd in (0, 1, 2):
        try:
            os.fchown(fd, ident.uid, ident.gid)
        except OSError:
            pass  # a pty slave the user cannot own is still usable


def execute(ex: Exec, flt: Filter | None, nnp: bool) -> None:
    """Load a deferred seccomp filter, close inherited descriptors at exec, exec."""
    if nnp and flt is not None:
        flt.load()
    try:
        syscalls.close_range(3, 0xFFFFFFFF, syscalls.CLOSE_RANGE_CLOEXEC)
    except OSError:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass
    with step(f"exec {ex.path}", ex.path, invalid=BAD_EXEC):  # e.g. a format or interpreter it lacks
        os.execve(ex.path, ex.args, ex.env)
