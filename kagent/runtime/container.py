"""From an OCI spec to a running container process: start_init, InitHandle.start, exec_process.

These run in the per-container worker (single-threaded, a child subreaper).
The split is runc's create/start: ``start_init`` forks the init, which builds
the container (namespaces, rootfs, process attributes), reports "ready" and
blocks; ``InitHandle.start`` releases it into its exec.  ``exec_process`` forks
a process into the running container's namespaces.

Every child talks to the worker over a Channel (see channel.py).  A child never
returns into the caller's code: it execs or ``os._exit``s, and a set-up
failure travels back as a structured SetupError.  Its end of the channel is
close-on-exec, so EOF means "exec'd" or "died": the kernel's PF_FORKNOEXEC
flag (cleared by execve before it closes those fds) tells which, and a child
that died without a word is a failure naming how it ended.  On any failure
the worker kills (by pid, only children not yet reaped) and reaps what it
forked, so nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from collections.abc import Callable
from typing import NoReturn

from kagent.errors import AgentError

from . import hooks, namespaces, rootfs, seccomp, syscalls, system
from . import process as proc
from .channel import Channel, _Abandoned
from .errors import InvalidSpec, SetupError, check_no_nul, step
from .stdio import ChildStdio, receive_console

log = logging.getLogger("kagent.runtime")

__all__ = ["SetupError", "InitHandle", "start_init", "exec_process"]


class InitHandle:
    """A container init that has been set up and waits for ``start()``."""

    def __init__(self, pid: int, chan: Channel, spec: dict, bundle: str, container_id: str) -> None:
        self.pid = pid
        self.container_id = container_id
        self.bundle = bundle
        self.warnings: list[str] = []
        self.started = False
        # A failed start() kills and reaps the init; its wait status (None: reaped elsewhere)
        # is then the worker's to report as the init's exit.
        self.reaped = False
        self.status: int | None = None
        self._chan: Channel | None = chan
        self._spec = spec

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message, extra={"container_id": self.container_id})

    def state(self, status: str) -> dict:
        return hooks.state(self._spec, self.container_id, status, self.pid, self.bundle)

    def start(self) -> None:
        """Release the init into its exec; raise SetupError if it died or its exec failed."""
        if self._chan is None:
            raise SetupError(
                "start", f"start: container {self.container_id} was already started or aborted"
            )
        chan, self._chan = self._chan, None
        pids = [self.pid]
        try:
            try:
                chan.send("start")
            except OSError as exc:
                raise _died("start", "the container init", pids) from exc
            _serve(chan, self._warn, pids, until_exec=("start", "the container init"))
        except BaseException:
            self.status, self.reaped = _kill_and_reap(pids), True
            raise
        finally:
            chan.close()
        self.started = True
        hooks.run(self._spec, "poststart", self.state("running"), warn=self._warn)

    def abort(self) -> None:
        """Kill and reap an init that was never started (a container deleted before start)."""
        if self._chan is None:
            return
        self._chan.close()
        self._chan = None
        _kill_and_reap([self.pid])


def start_init(
    spec: dict,
    bundle: str,
    stdio: ChildStdio,
    *,
    on_forked: Callable[[int], None] | None = None,
    container_id: str | None = None,
    enter_cgroup: Callable[[], None] | None = None,
) -> InitHandle:
    """Fork the container's init and set it up; it then waits for ``InitHandle.start()``.

    ``on_forked(pid)`` (tests) runs in the worker while the child waits for it;
    ``enter_cgroup()`` runs in the child before it does anything else (the
    cgroup placement: kagent.cgroups Manager.enter).  With a new pid namespace
    owned by a new user namespace the init is that child's child and inherits
    its cgroups.  ``stdio`` is consumed.
    """
    cid = container_id or os.path.basename(os.path.normpath(bundle))
    try:
        plan = _check(spec)
        root = rootfs.root_path(spec, bundle)
    except BaseException:
        stdio.close()
        raise
    parent, child = Channel.pair()
    try:
        if plan.child_makes_pidns:
            # the init will be our grandchild; its parent exits, so it must be reparented to us
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        new_pid = "pid" in plan.new and not plan.child_makes_pidns
        with (
            namespaces.pid_for_children(plan.joined.get("pid"), new_pid),
            step("fork the container init"),
        ):
            pid = os.fork()
            if pid == 0:
                parent.close()
                _child(child, lambda ch: _init_body(ch, spec, bundle, cid, root, plan, stdio,
                                                    on_forked is not None, enter_cgroup))
    except BaseException:
        parent.close()
        child.close()
        stdio.close()
        raise
    child.close()
    stdio.close()
    handle = InitHandle(pid, parent, spec, bundle, cid)
    pids = [pid]
    try:
        if on_forked is not None:
            _go(parent, pids, on_forked, "init", "the container init")
        _serve(parent, handle._warn, pids, handle=handle, stdio=stdio)
    except BaseException:
        _kill_and_reap(pids)
        parent.close()
        handle._chan = None
        raise
    return handle


def exec_process(
    init_pid: int,
    spec: dict,
    process: dict,
    stdio: ChildStdio,
    *,
    on_forked: Callable[[int], None] | None = None,
    enter_cgroup: Callable[[], None] | None = None,
) -> int:
    """Fork ``process`` into the namespaces of the container whose init is ``init_pid``;
    ``on_forked`` and ``enter_cgroup`` as for start_init.

    Returns the pid once the exec has happened; a failure before it raises
    SetupError and leaves nothing behind.  ``stdio`` is consumed.
    """
    try:
        proc.check(process)
    except BaseException:
        stdio.close()
        raise
    parent, child = Channel.pair()
    try:
        target = None if namespaces.same_pid_ns(init_pid) else f"/proc/{init_pid}/ns/pid"
        with namespaces.pid_for_children(target), step("fork into the container"):
            pid = os.fork()
            if pid == 0:
                parent.close()
                _child(
                    child,
                    lambda ch: _exec_body(
                        ch, init_pid, spec, process, stdio, on_forked is not None, enter_cgroup
                    ),
                )
    except FileNotFoundError as exc:
        parent.close()
        child.close()
        stdio.close()
        raise SetupError(
            "exec",
            f"exec: the container init (pid {init_pid}) is gone",
            path=exc.filename,
            errno=exc.errno,
        ) from exc
    except BaseException:
        parent.close()
        child.close()
        stdio.close()
        raise
    child.close()
    stdio.close()
    pids = [pid]
    try:
        if on_forked is not None:
            _go(parent, pids, on_forked, "exec", "the process")
        _serve(parent, lambda m: log.warning("%s", m), pids, until_exec=("exec", "the process"),
               stdio=stdio)
    except BaseException:
        _kill_and_reap(pids)
        raise
    finally:
        parent.close()
    return pid


# --- the worker's side of a set-up conversation ---------------------------------------------


def _serve(
    chan: Channel,
    warn: Callable[[str], None],
    pids: list[int],
    *,
    until_exec: tuple[str, str] | None = None,
    handle: InitHandle | None = None,
    stdio: ChildStdio | None = None,
) -> None:
    """Answer the child until it reports ready or, with ``until_exec`` (step, who), execs.

    ``pids`` is what the caller kills and reaps on failure; it follows the init when a
    first child forks it.
    """
    step_name, who = until_exec or ("init", "the container init")
    while True:
        msg = chan.recv()
        if msg is None:
            if until_exec and _has_exec(pids[-1]):
                return
            raise _died(step_name, who, pids)
        kind = msg.get("type")
        if kind == "warning":
            warn(str(msg.get("message")))
        elif kind == "error":
            _let_exit(pids[-1])
            raise SetupError.from_dict(msg)
        elif kind == "ready" and not until_exec:
            return
        elif kind == "console" and "fd" in msg and stdio is not None:
            receive_console(stdio, int(msg["fd"]))
        elif kind == "userns" and handle is not None:
            namespaces.write_id_maps(pids[-1], handle._spec)
            _send(chan, pids, step_name, who, "mapped")
        elif kind == "pid" and handle is not None:
            # the first child forked the init into the new pid namespace and is exiting
            _reap(pids[-1])
            handle.pid = int(msg["pid"])
            pids[:] = [handle.pid]
        elif kind == "hooks" and handle is not None:
            st = handle.state("creating")
            hooks.run(handle._spec, "prestart", st)
            hooks.run(handle._spec, "createRuntime", st)
            _send(chan, pids, step_name, who, "hooked", pid=handle.pid)
        else:
            if "fd" in msg:
                os.close(msg["fd"])
            raise SetupError("set-up", f"set-up: unexpected message {msg!r}")


def _go(chan: Channel, pids: list[int], on_forked: Callable[[int], None], step_name: str, who: str) -> None:
    """Run the caller's on_forked, then let the child (waiting for it) proceed."""
    on_forked(pids[-1])
    _send(chan, pids, step_name, who, "go")


def _send(chan: Channel, pids: list[int], step_name: str, who: str, kind: str, **fields: object) -> None:
    try:
        chan.send(kind, **fields)
    except OSError as exc:  # EPIPE: the child's end is gone, and it cannot have exec'd yet
        raise _died(step_name, who, pids) from exc


# task->flags bit "forked but didn't exec": execve clears it before it closes the
# close-on-exec descriptors, so it is settled by the time the channel reads EOF.
PF_FORKNOEXEC = 0x40


def _has_exec(pid: int) -> bool:
    """Whether ``pid`` (our child, not reaped: a zombie keeps its flags) has exec'd."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False  # reaped elsewhere: its exit will never be reported, so not a success
    flags = int(stat.rsplit(b")", 1)[1].split()[6])  # field 9; comm (field 2) may hold spaces
    return not flags & PF_FORKNOEXEC


def _died(step_name: str, who: str, pids: list[int]) -> SetupError:
    """The child closed its end of the channel without a report and without exec: it is
    exiting.  Say how it ended (waiting, not reaping: the caller's clean-up reaps it)."""
    pid = pids[-1]
    killed_by = None
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        how = _describe_exit(info.si_code, info.si_status)
        if info.si_code != os.CLD_EXITED:
            killed_by = info.si_status
    except ChildProcessError:
        pids.remove(pid)  # reaped elsewhere: the pid may be another process's by now
        how = "it had exited and was reaped already"
    if step_name == "init":
        text = f"init: {who} exited during set-up ({how})"
    else:
        text = f"{step_name}: {who} died before its exec ({how})"
    if killed_by == signal.SIGSYS:  # a seccomp filter's kill: only the spec installs one
        err: SetupError = InvalidSpec(step_name, f"{text}: the spec's seccomp filter kills a system "
                                                 "call that the set-up or the exec needs")
    else:
        err = SetupError(step_name, text)
    err.killed_by = killed_by  # the worker tells an OOM kill from the others (it has the cgroup)
    return err


def _let_exit(pid: int, timeout: float = 1.0) -> None:
    """An error record is a child's last word, then it exits: let it, so that the status the
    host gets is its own and not that of the clean-up's SIGKILL."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)  # readable once it has exited
    finally:
        os.close(fd)


def _kill_and_reap(pids: list[int]) -> int | None:
    """SIGKILL and reap our children ``pids`` (none reaped yet, so none a recycled pid);
    the wait status of the last one (the init)."""
    status = None
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # an exiting child keeps the status it exits with
        except ProcessLookupError:
            pass
        status = _reap(pid)
    pids.clear()
    return status


def _reap(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None  # reaped elsewhere (the worker's own reaper)


def _describe_exit(code: int, value: int) -> str:
    if code == os.CLD_EXITED:
        return f"exit status {value}"
    try:
        name = f" ({signal.Signals(value).name})"
    except ValueError:
        name = ""
    return f"killed by signal {value}{name}"


def _check(spec: dict) -> namespaces.Plan:
    """What can be refused before forking anything."""
    if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
        raise InvalidSpec("spec", "spec: process.args is required")
    for section in ("root", "mounts", "hostname", "domainname", "linux", "hooks"):
        check_no_nul(spec.get(section), section)  # what reaches the kernel (not annotations)
    proc.check(spec["process"])
    plan = namespaces.plan(spec)
    linux = spec.get("linux") or {}
    if "user" in plan.new and not (linux.get("uidMappings") and linux.get("gidMappings")):
        raise InvalidSpec(
            "spec", "spec: a new user namespace needs linux.uidMappings and linux.gidMappings"
        )
    if not plan.has("mount"):
        raise InvalidSpec("spec", "spec: a container needs a mount namespace of its own")
    system.check_sysctl(spec, plan)
    hooks.validate(spec)
    return plan


# --- the child's side ----------------------------------------------------------------------


def _child(chan: Channel, body: Callable[[Channel], None]) -> NoReturn:
    """Run ``body`` in a forked child; it must exec.  Never returns into the caller's code."""
    code = 1
    try:
        _reset_signals()
        body(chan)
        _report(chan, SetupError("exec", "exec: set-up returned without exec"))
    except _Abandoned:
        code = 2  # the worker gave up on us (or died): nothing to report to
    except SetupError as exc:
        _report(chan, exc)
    except AgentError as exc:  # another domain error: its code goes with it
        _report(chan, SetupError("set-up", f"set-up: {exc.message}", code=exc.code))
    except OSError as exc:
        _report(chan, SetupError.from_oserror("set-up", exc))
    except BaseException as exc:  # a bug: say so rather than die silently
        _report(chan, SetupError("set-up", f"set-up: {type(exc).__name__}: {exc}"))
    finally:
        os._exit(code)


def _report(chan: Channel, exc: SetupError) -> None:
    try:
        chan.send("error", **exc.to_dict())
    except OSError:
        pass


_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "arm64": 134}


def _reset_signals() -> None:
    """The worker's handlers must not run here, and its ignored/blocked signals must not leak
    into the container (Python ignores SIGPIPE and SIGXFSZ; whoever started the agent may
    have ignored more, even the real-time signals glibc reserves, which Python cannot set)."""
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) is not signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            _default_disposition_raw(sig)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _default_disposition_raw(sig: int) -> None:
    """rt_sigaction(sig, SIG_DFL) straight to the kernel, past glibc's reserved-signal guard."""
    import ctypes
    import platform

    nr = _SYS_RT_SIGACTION.get(platform.machine())
    if nr is None:
        return
    # struct kernel_sigaction {handler, flags, restorer, mask}: all zero is SIG_DFL.
    act = (ctypes.c_ulong * 4)()
    ctypes.CDLL(None, use_errno=True).syscall(nr, sig, ctypes.byref(act), None, 8)


def _begin(chan: Channel, wait_go: bool, enter_cgroup: Callable[[], None] | None) -> None:
    """A child's first steps: wait while the worker runs its on_forked hook, if it has one,
    then enter the container's cgroup, before anything else (namespaces included) and while
    the cgroup files are still in view (the worker's mount namespace)."""
    if wait_go:
        chan.expect("go")
    if enter_cgroup is not None:
        with step("enter the container's cgroup"):
            enter_cgroup()


def _init_body(
    chan: Channel,
    spec: dict,
    bundle: str,
    cid: str,
    root: str,
    plan: namespaces.Plan,
    stdio: ChildStdio,
    wait_go: bool,
    enter_cgroup: Callable[[], None] | None,
) -> None:
    _begin(chan, wait_go, enter_cgroup)

    def warn(message: str) -> None:
        chan.send("warning", message=message)

    linux = spec.get("linux") or {}
    process = spec["process"]
    flt = seccomp.compile(linux.get("seccomp"), warn)

    # Before any user namespace: lowering the score needs CAP_SYS_RESOURCE in the initial one
    # (as runc's nsexec does it); a forked pid-namespace init inherits it.
    proc.set_oom_score_adj(process)
    namespaces.join(plan)
    if "user" in plan.new:
        namespaces.unshare_new(plan, {"user"})
        chan.send("userns")
        chan.expect("mapped")
        if namespaces.maps_root(spec):
            with step("become root of the user namespace"):
                os.setresgid(0, 0, 0)  # so that what we create is owned by the namespace's root
                os.setresuid(0, 0, 0)
    others = plan.new - {"user", "pid"}
    if plan.child_makes_pidns:
        others.add("pid")
    namespaces.unshare_new(plan, others)
    if plan.child_makes_pidns:
        _fork_into_pidns(chan)

    new_mnt = "mount" in plan.new
    if new_mnt:
        rootfs.prepare(root)
        rootfs.mount_all(root, bundle, spec, warn, in_cgroupns=plan.has("cgroup"))
    chan.send("hooks")  # prestart and createRuntime run in the worker now
    host_pid = int(chan.expect("hooked")["pid"])
    st = hooks.state(spec, cid, "creating", host_pid, bundle)
    hooks.run(spec, "createContainer", st)
    if new_mnt:
        rootfs.pivot(root)
    system.set_names(spec, plan)
    system.apply_sysctl(spec)
    if new_mnt:
        rootfs.readonly_paths(list(linux.get("readonlyPaths") or []))
        rootfs.masked_paths(list(linux.get("maskedPaths") or []))
        if (spec.get("root") or {}).get("readonly"):
            rootfs.readonly_root()
        rootfs.set_propagation(spec)

    ex = proc.apply(process, stdio, flt, warn, console=lambda fd: chan.send_fd("console", fd))
    chan.send("ready")
    chan.expect("start")
    hooks.run(spec, "startContainer", dict(st, status="created"))
    proc.execute(ex, flt, bool(process.get("noNewPrivileges")))


def _fork_into_pidns(chan: Channel) -> None:
    """In the first child: fork the init into the pid namespace just created; only the init returns."""
    r, w = os.pipe2(os.O_CLOEXEC)
    with step("fork the init into the new pid namespace"):
        pid = os.fork()
    if pid:
        os.close(r)
        chan.send("pid", pid=pid)
        os._exit(0)
    os.close(w)
    # The worker reaps our parent on "pid" before reading anything else; wait for its
    # exit (EOF) so our messages come after that one.
    os.read(r, 1)
    os.close(r)


def _exec_body(
    chan: Channel, init_pid: int, spec: dict, process: dict, stdio: ChildStdio, wait_go: bool,
    enter_cgroup: Callable[[], None] | None,
) -> None:
    _begin(chan, wait_go, enter_cgroup)

    def warn(message: str) -> None:
        chan.send("warning", message=message)

    flt = seccomp.compile((spec.get("linux") or {}).get("seccomp"), warn)
    namespaces.enter_container(init_pid)
    ex = proc.apply(process, stdio, flt, warn, console=lambda fd: chan.send_fd("console", fd))
    proc.execute(ex, flt, bool(process.get("noNewPrivileges")))
