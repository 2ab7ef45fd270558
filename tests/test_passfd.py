"""Direct stdio streams (kagent.passfd): streams filed by port, pumps pipe ⇄ socket.

vsock has no loopback here, so the listener is a unix socket and each host
stream names its port by the name it binds (``...stdout.4321``), as the module
allows for tests.  The process is a real ``cat`` between real pipes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from types import SimpleNamespace

import pytest

from kagent import passfd, stdio
from kagent.errors import NotFound

MiB = 1 << 20


async def host_stream(listen_path: str, tag: str, port: int) -> socket.socket:
    """What the VMM does for the host: connect one stream from ``port``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0kagent-test-{os.getpid()}-{tag}.{port}")
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, listen_path)
    return s


async def recv_all(s: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(s, MiB):
        chunks.append(data)
    return b"".join(chunks)


def start_listener(sock_dir: str) -> passfd.Listener:
    lst = passfd.Listener("unix://" + os.path.join(sock_dir, "passfd.sock"))
    lst.start()
    return lst


def test_peer_port():
    assert passfd.peer_port((3, 1027)) == 1027
    assert passfd.peer_port("\0host-stdout.4321") == 4321
    assert passfd.peer_port(b"/tmp/x.55") == 55
    assert passfd.peer_port("") is None and passfd.peer_port("/tmp/noport") is None


async def test_streams_are_filed_by_port_and_waited_for(tmp_sock_dir):
    lst = passfd.Listener("unix://" + os.path.join(tmp_sock_dir, "p.sock"))
    lst.start()
    path = os.path.join(tmp_sock_dir, "p.sock")
    try:
        a = await host_stream(path, "a", 4001)
        got = await lst.take(4001)
        assert got.getpeername().endswith(b".4001")  # an abstract name comes back as bytes
        got.close()

        async def late():
            await asyncio.sleep(0.1)
            return await host_stream(path, "b", 4002)

        b_task = asyncio.create_task(late())
        got = await lst.take(4002)  # not there yet: waits for it (upstream retries for ~0.3 s)
        got.close()
        with pytest.raises(NotFound) as err:
            await lst.take(4999)
        assert "4999" in err.value.message
        a.close()
        (await b_task).close()
    finally:
        lst.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("splice", [True, False])
async def test_output_pump_moves_everything_then_eof(tmp_sock_dir, splice, monkeypatch):
    calls = []
    real = os.splice
    monkeypatch.setattr(os, "splice", lambda *a, **k: calls.append(1) or real(*a, **k))
    r, w = os.pipe()
    near, far = socket.socketpair()
    far.setblocking(False)
    data = os.urandom(3 * MiB + 17)
    pump = passfd.Pump(r, near.detach(), name="test stdout", splice=splice)
    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, lambda: (_write_all(w, data), os.close(w)))
    got = await recv_all(far)
    await writer
    await pump.done
    assert got == data and pump.moved == len(data)
    assert bool(calls) == splice
    far.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def test_output_pump_ends_after_exit_even_if_a_child_holds_the_pipe(monkeypatch):
    monkeypatch.setattr(passfd, "EXIT_DRAIN", 0.1)
    r, w = os.pipe()
    near, far = socket.socketpair()
    far.setblocking(False)
    exited = asyncio.get_running_loop().create_future()
    pump = passfd.Pump(r, near.detach(), name="stdout", exited=exited)
    os.write(w, b"last words")
    await asyncio.sleep(0.05)
    exited.set_result(0)  # the process is gone; ``w`` (a lingering child's copy) stays open
    assert await asyncio.wait_for(recv_all(far), 5) == b"last words"
    await pump.done
    os.close(w)
    far.close()


async def test_attach_pumps_a_real_process_both_ways(tmp_sock_dir):
    """stdin stream → cat → stdout stream; the stdin stream's end is the process's end of input."""
    listener = start_listener(tmp_sock_dir)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    cat = subprocess.Popen(["cat"], stdin=in_r, stdout=out_w, stderr=err_w)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    proc = SimpleNamespace(exec_id="e1", terminal=False, exited=exited, stdin=stdio.InputStream(in_w),
                           stdout=stdio.OutputStream(out_r, exited), stderr=stdio.OutputStream(err_r, exited))
    path = listener.address.path
    h_in, h_out, h_err = [await host_stream(path, n, p) for n, p in (("in", 5001), ("out", 5002), ("err", 5003))]
    streams = passfd.attach(await passfd.claim(listener, stdin_port=5001, stdout_port=5002, stderr_port=5003), proc)
    try:
        data = os.urandom(2 * MiB + 3)
        reader = asyncio.create_task(recv_all(h_out))
        await loop.sock_sendall(h_in, data)
        h_in.close()  # end of input: the pump closes cat's stdin
        assert await asyncio.wait_for(reader, 10) == data
        assert await loop.run_in_executor(None, cat.wait) == 0
        exited.set_result(0)
        await asyncio.wait_for(streams.outputs_done(), 5)
        assert await recv_all(h_err) == b""
    finally:
        streams.close()
        for s in (h_out, h_err):
            s.close()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        if cat.poll() is None:
            cat.kill()
            cat.wait()
        listener.close()


async def test_attach_with_a_terminal_copies_through_the_pty(tmp_sock_dir):
    import tty

    listener = start_listener(tmp_sock_dir)
    master, slave = os.openpty()
    tty.setraw(slave)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    out = stdio.OutputStream(os.dup(master), exited, pty=True)
    proc = SimpleNamespace(exec_id="t1", terminal=True, exited=exited,
                           stdin=stdio.InputStream(master, pty=True, owns_fd=True), stdout=out, stderr=None)
    h_out = await host_stream(listener.address.path, "tout", 5102)
    streams = passfd.attach(await passfd.claim(listener, stdout_port=5102), proc)
    try:
        os.write(slave, b"from the terminal")
        got = b""
        async with asyncio.timeout(5):
            while len(got) < 17:
                got += await loop.sock_recv(h_out, 100)
        assert got == b"from the terminal"
        os.close(slave)  # the slave side hangs up: EIO is the pty's end of output
        await asyncio.wait_for(streams.outputs_done(), 5)
        assert await recv_all(h_out) == b""
    finally:
        streams.close()
        h_out.close()
        out.close()
        proc.stdin.close()
        listener.close()
