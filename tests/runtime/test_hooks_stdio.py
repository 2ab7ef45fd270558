"""Hooks (state JSON on stdin, timeouts, failures) and stdio (pipes, pty, pipe sizes), without containers."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import termios
import time

import pytest

from kagent.runtime import hooks, stdio
from kagent.runtime.errors import SetupError

STATE = hooks.state({"ociVersion": "1.1.0", "annotations": {"k": "v"}}, "cid", "creating", 42, "/b")


def test_state_shape():
    assert STATE == {
        "ociVersion": "1.1.0",
        "id": "cid",
        "status": "creating",
        "pid": 42,
        "bundle": "/b",
        "annotations": {"k": "v"},
    }


def test_hook_reads_state_on_stdin(scratch):
    out = scratch / "state"
    hook = {
        "path": "/bin/sh",
        "args": ["sh", "-c", f'{{ cat; echo; echo "$X"; }} > {out}'],
        "env": ["X=env-ok"],
    }
    hooks.run({"hooks": {"prestart": [hook]}}, "prestart", STATE)
    text = out.read_text().splitlines()
    assert json.loads(text[0]) == STATE and text[1] == "env-ok"


def test_failing_hook_reports_status_and_output():
    hook = {"path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 4"]}
    with pytest.raises(SetupError) as info:
        hooks.run(
            {"hooks": {"createRuntime": [hook, {"path": "/bin/true"}]}}, "createRuntime", STATE
        )
    assert str(info.value) == "hook createRuntime[0] /bin/sh: failed with exit status 4: broken"
    assert info.value.path == "/bin/sh"


def test_hook_timeout_kills_it():
    t0 = time.monotonic()
    with pytest.raises(SetupError, match=r"hook prestart\[0\] /bin/sleep: timed out after 1s"):
        hooks.run(
            {
                "hooks": {
                    "prestart": [{"path": "/bin/sleep", "args": ["sleep", "10"], "timeout": 1}]
                }
            },
            "prestart",
            STATE,
        )
    assert time.monotonic() - t0 < 5


def test_missing_hook_binary():
    with pytest.raises(SetupError) as info:
        hooks.run({"hooks": {"prestart": [{"path": "/no/such/hook"}]}}, "prestart", STATE)
    assert info.value.errno == 2 and info.value.path == "/no/such/hook"


def test_post_hooks_only_warn():
    warnings = []
    spec = {"hooks": {"poststop": [{"path": "/bin/false"}, {"path": "/bin/true"}]}}
    hooks.run(spec, "poststop", STATE, warn=warnings.append)
    assert warnings == ["hook poststop[0] /bin/false: failed with exit status 1"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"prestrat": []}, "unknown hook kind"),
        ({"prestart": [{"path": "relative/hook"}]}, "must be absolute"),
        ({"poststart": [{"path": "/bin/true", "timeout": 0}]}, "timeout must be positive"),
    ],
)
def test_validate(bad, match):
    with pytest.raises(SetupError, match=match):
        hooks.validate({"hooks": bad})


# --- stdio ---------------------------------------------------------------------------------


def test_pipes_are_cloexec_and_connected():
    parent, child = stdio.make_stdio(False)
    try:
        fds = [parent.stdin, parent.stdout, parent.stderr, child.stdin, child.stdout, child.stderr]
        assert len(set(fds)) == 6 and not any(os.get_inheritable(fd) for fd in fds)
        os.write(parent.stdin, b"in")
        assert os.read(child.stdin, 10) == b"in"
        os.write(child.stdout, b"out")
        os.write(child.stderr, b"err")
        assert (os.read(parent.stdout, 10), os.read(parent.stderr, 10)) == (b"out", b"err")
        assert parent.master is None
    finally:
        parent.close()
        child.close()
    assert parent.stdin == -1 and child.stdout == -1


def test_pty_is_made_by_the_child_and_received_by_the_parent():
    parent, child = stdio.make_stdio(True)
    assert child.wants_console and child.console is parent and parent.stdin == -1
    master, slave = stdio.open_console()  # what the container process does
    try:
        stdio.receive_console(child, master)  # what the worker does with the fd it receives
        assert parent.stdin == parent.stdout == parent.master == master and parent.stderr is None
        assert os.isatty(slave) and os.ttyname(slave).startswith("/dev/pts/")
        fcntl.ioctl(parent.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
        assert (rows, cols) == (40, 120)
        os.write(slave, b"hi")
        assert os.read(parent.master, 10) == b"hi"
        other, other_slave = stdio.open_console()
        os.close(other_slave)
        with pytest.raises(ValueError):  # a second console is refused (and closed)
            stdio.receive_console(child, other)
    finally:
        parent.close()
        os.close(slave)


def test_pipe_size():
    size = min(1 << 20, stdio.pipe_max_size())
    parent, child = stdio.make_stdio(False, pipe_size=size)
    try:
        assert fcntl.fcntl(parent.stdout, stdio.F_GETPIPE_SZ) == size
        assert fcntl.fcntl(parent.stderr, stdio.F_GETPIPE_SZ) == size
    finally:
        parent.close()
        child.close()


def test_pipe_size_over_the_limit_names_size_and_limit():
    limit = stdio.pipe_max_size()
    want = limit * 4
    before = set(os.listdir("/proc/self/fd"))
    try:
        parent, child = stdio.make_stdio(False, pipe_size=want)
    except PermissionError as exc:
        assert f"pipe size {want} exceeds /proc/sys/fs/pipe-max-size ({limit})" in str(exc)
        assert set(os.listdir("/proc/self/fd")) == before  # nothing leaked
    else:  # a root with CAP_SYS_RESOURCE may exceed the limit
        parent.close()
        child.close()
        pytest.skip("this process may exceed pipe-max-size (CAP_SYS_RESOURCE)")
