"""The syscall wrappers: both twins make the same calls and raise the same errors."""

from __future__ import annotations

import errno
import os

import pytest

from kagent import _fast
from kagent.runtime import syscalls

TWINS = {"pure": syscalls.PURE, "compiled": syscalls.COMPILED}


def test_compiled_syscalls_loaded_unless_disabled():
    """Guard: a compiled module that silently failed to load must fail the suite."""
    if os.environ.get("KAGENT_NO_EXTENSIONS") == "1":
        assert syscalls.COMPILED is None and syscalls.IMPLEMENTATION == "pure"
    else:
        assert syscalls.COMPILED is not None, (
            f"kagent._fast.syscalls did not load: {_fast.status()}"
        )
        assert syscalls.IMPLEMENTATION == "compiled"
        assert syscalls.mount is syscalls.COMPILED.mount


def _twins():
    return [
        pytest.param(
            name,
            marks=[] if mod is not None else pytest.mark.skip(reason="compiled twin not loaded"),
        )
        for name, mod in TWINS.items()
    ]


#: calls that fail harmlessly, with the errno and the message they must produce
FAILING = [
    (
        lambda s: s.mount("none", "/nonexistent-kagent/x", "tmpfs", syscalls.MS_NOSUID, "size=1k"),
        errno.ENOENT,
        "mount('none', '/nonexistent-kagent/x', 'tmpfs', 0x2): No such file or directory",
    ),
    (
        lambda s: s.mount(None, "/nonexistent-kagent", None, syscalls.MS_PRIVATE),
        errno.ENOENT,
        "mount(None, '/nonexistent-kagent', None, 0x40000): No such file or directory",
    ),
    (
        lambda s: s.umount2(b"/nonexistent-kagent", syscalls.MNT_DETACH),
        errno.ENOENT,
        "umount2('/nonexistent-kagent', 0x2): No such file or directory",
    ),
    (
        lambda s: s.pivot_root("/nonexistent-kagent", "/nonexistent-kagent"),
        errno.ENOENT,
        "pivot_root('/nonexistent-kagent', '/nonexistent-kagent'): No such file or directory",
    ),
    (lambda s: s.unshare(0x1), errno.EINVAL, "unshare(0x1): Invalid argument"),
    (
        lambda s: s.setns(987654, syscalls.CLONE_NEWNET),
        errno.EBADF,
        "setns(987654, 0x40000000): Bad file descriptor",
    ),
    (lambda s: s.prctl(12345), errno.EINVAL, "prctl(12345, 0): Invalid argument"),
    (lambda s: s.close_range(10, 3), errno.EINVAL, "close_range(10, 3, 0x0): Invalid argument"),
]


@pytest.mark.parametrize("twin", _twins())
@pytest.mark.parametrize("case", range(len(FAILING)))
def test_errors_name_the_call(twin, case):
    call, code, message = FAILING[case]
    with pytest.raises(OSError) as info:
        call(TWINS[twin])
    assert info.value.errno == code
    if message is not None:
        assert info.value.strerror == message
        assert str(info.value) == f"[Errno {code}] {message}"
    # the errno picks the subclass, like any OSError from os.*
    assert type(info.value) is type(OSError(code, "x"))


@pytest.mark.parametrize("twin", _twins())
def test_reads_agree_with_the_kernel(twin):
    s = TWINS[twin]
    eff, prm, inh = s.capget()
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    assert (eff, prm, inh) == tuple(int(status[k], 16) for k in ("CapEff", "CapPrm", "CapInh"))
    assert s.prctl(syscalls.PR_GET_NO_NEW_PRIVS) == int(status["NoNewPrivs"])
    assert s.prctl(syscalls.PR_CAPBSET_READ, 0) == int(status["CapBnd"], 16) & 1


@pytest.mark.parametrize("twin", _twins())
def test_successful_calls_in_a_child(twin):
    """unshare, sethostname, setdomainname, PR_SET_NAME, close_range, capset — in a throwaway child
    (never in the pytest process: these change the caller)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            s = TWINS[twin]
            s.unshare(syscalls.CLONE_NEWUTS)
            s.sethostname("kagent-twin")
            s.setdomainname(b"kagent-dom")
            s.prctl(syscalls.PR_SET_NAME, b"kagent-probe")
            fd = os.open("/dev/null", os.O_RDONLY)
            os.set_inheritable(fd, True)
            s.close_range(fd, fd, syscalls.CLOSE_RANGE_CLOEXEC)
            with open("/proc/self/comm") as f:
                comm = f.read().strip()
            out = f"{os.uname().nodename} {os.uname()[1]} {comm} {os.get_inheritable(fd)}"
            with open("/proc/sys/kernel/domainname") as f:
                out += " " + f.read().strip()
            eff, prm, inh = s.capget()
            s.capset(eff & ~1, prm & ~1, inh)  # drop CAP_CHOWN ...
            try:
                s.capset(eff, prm, inh)  # ... and it cannot come back
            except PermissionError as exc:
                out += f" {exc.strerror}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.close(r)
    os.waitpid(pid, 0)
    eff, prm, inh = syscalls.capget()
    assert out == (
        f"kagent-twin kagent-twin kagent-probe False kagent-dom "
        f"capset({eff:#x}, {prm:#x}, {inh:#x}): Operation not permitted"
    )
    assert os.uname().nodename != "kagent-twin"


def test_select_rebinds_every_name():
    before = syscalls.IMPLEMENTATION
    try:
        syscalls.select("pure")
        assert all(getattr(syscalls, n) is getattr(syscalls.PURE, n) for n in syscalls.__all__)
        if syscalls.COMPILED is not None:
            syscalls.select("compiled")
            assert all(
                getattr(syscalls, n) is getattr(syscalls.COMPILED, n) for n in syscalls.__all__
            )
        with pytest.raises(ValueError):
            syscalls.select("turbo")
    finally:
        syscalls.select(before)
