"""A container child's channel reads EOF at its exec or at its death: the runtime tells them
apart (PF_FORKNOEXEC), so a child that dies before exec without a word is a failure that
says how it ended, and leaves no process and no open stdio behind."""

from __future__ import annotations

import os
import signal

import pytest
from runtime_harness import communicate, in_worker

from kagent.runtime.container import SetupError, exec_process, start_init
from kagent.runtime.errors import InvalidSpec
from kagent.runtime.stdio import make_stdio
from kagent.ttrpc.codes import Code

pytestmark = pytest.mark.root


def _children() -> list[int]:
    """This worker's children that are still there (zombies too)."""
    me = str(os.getpid())
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.append(int(name))
            except OSError:
                pass
    return kids


def _kill_init(h, init_parent) -> None:
    os.kill(h.pid, signal.SIGKILL)
    os.waitpid(h.pid, 0)
    init_parent.close()


def _seccomp_kill(*names: str, **arg) -> dict:
    rule = {"names": list(names), "action": "SCMP_ACT_KILL"}
    if arg:
        rule["args"] = [{"op": "SCMP_CMP_EQ", **arg}]
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}


def test_exec_child_killed_before_exec_is_a_failure(spec, bundle, impl):
    """SIGKILLed between fork and exec (here by on_forked, before it is let go): before the fix
    exec_process returned its pid as if it had exec'd."""

    def body(s, b):
        init_parent, init_child = make_stdio(False)
        h = start_init(s, b, init_child)
        h.start()
        parent, child = make_stdio(False)
        try:
            exec_process(h.pid, s, {"args": ["/bin/true"], "cwd": "/"}, child,
                         on_forked=lambda pid: os.kill(pid, signal.SIGKILL))
        except SetupError as exc:
            err = exc
        else:
            err = None
        out = communicate(parent)  # EOF at once: no process holds the child's ends
        kids = _children()
        _kill_init(h, init_parent)
        return err, out, kids, h.pid

    err, out, kids, init_pid = in_worker(body, spec(["sleep", "30"]), bundle, impl=impl)
    assert err is not None and not isinstance(err, InvalidSpec), err
    assert err.step == "exec" and str(err) == (
        "exec: the process died before its exec (killed by signal 9 (SIGKILL))"), err
    assert out == (b"", b"") and kids == [init_pid]


def test_exec_child_killed_by_seccomp_before_exec_is_a_failure(spec, bundle):
    """The process's own set-up is killed (its user switch, by the container's seccomp profile):
    no error record can be written, and the status names the signal."""

    def body(s, b):
        init_parent, init_child = make_stdio(False)
        h = start_init(s, b, init_child)
        h.start()
        parent, child = make_stdio(False)
        process = {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 1000, "gid": 1000},
                   "noNewPrivileges": False}  # the filter is loaded before the user switch
        try:
            exec_process(h.pid, s, process, child)
        except SetupError as exc:
            err = exc
        else:
            err = None
        parent.close()
        kids = _children()
        _kill_init(h, init_parent)
        return err, kids, h.pid

    s = spec(["sleep", "30"])
    s["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]  # no core file
    s["linux"]["seccomp"] = _seccomp_kill("setresuid", index=0, value=1000)
    err, kids, init_pid = in_worker(body, s, bundle)
    assert err is not None and err.step == "exec", err
    assert "died before its exec (killed by signal 31 (SIGSYS))" in str(err), err
    assert kids == [init_pid]


def test_init_killed_at_start_before_exec_is_a_failure(spec, bundle, impl):
    """The init dies between "start" and its exec (seccomp kills the close_range that precedes
    execve): before the fix start() returned as if the container were running."""

    def body(s, b):
        parent, child = make_stdio(False)
        h = start_init(s, b, child)
        try:
            h.start()
        except SetupError as exc:
            err = exc
        else:
            err = None
        out = communicate(parent)
        return err, h.started, h.reaped, h.status, out, _children()

    s = spec(["true"])
    s["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]
    s["linux"]["seccomp"] = _seccomp_kill("close_range")
    err, started, reaped, status, out, kids = in_worker(body, s, bundle, impl=impl)
    assert err is not None and err.step == "start", err
    assert str(err) == ("start: the container init died before its exec (killed by signal 31 (SIGSYS)): "
                        "the spec's seccomp filter kills a system call that the set-up or the exec needs")
    assert err.code == Code.INVALID_ARGUMENT
    assert not started and reaped and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    assert out == (b"", b"") and kids == []


def test_init_killed_during_set_up_says_how(spec, bundle):
    def body(s, b):
        parent, child = make_stdio(False)
        try:
            start_init(s, b, child, on_forked=lambda pid: os.kill(pid, signal.SIGKILL))
        except SetupError as exc:
            err = exc
        else:
            err = None
        parent.close()
        return err, _children()

    err, kids = in_worker(body, spec(["true"]), bundle)
    assert err is not None and err.step == "init", err
    assert str(err) == "init: the container init exited during set-up (killed by signal 9 (SIGKILL))"
    assert kids == []


def test_processes_that_exec_and_exit_at_once_are_not_mistaken_for_deaths(spec, bundle, impl):
    """The other side of the check: EOF then a zombie, already gone, is still an exec."""

    def body(s, b):
        init_parent, init_child = make_stdio(False)
        h = start_init(s, b, init_child)
        h.start()
        statuses = []
        for args in (["true"], ["false"], ["sh", "-c", "kill -9 $$"]) * 10:
            parent, child = make_stdio(False)
            pid = exec_process(h.pid, s, {"args": args, "cwd": "/", "env": ["PATH=/bin"]}, child)
            parent.close()
            statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        _kill_init(h, init_parent)
        return statuses

    assert in_worker(body, spec(["sleep", "30"]), bundle, impl=impl) == [0, 1, -9] * 10
