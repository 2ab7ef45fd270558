"""Direct stdio streams end to end: a real agent with its passfd listener, real containers.

The host side is what the VMM does for the host runtime: one stream per stdio, connected to
the agent's listener from a port the request then names.  vsock has no loopback here, so the
listener is a unix socket and each stream names its port by the abstract name it binds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import tempfile

import pytest
from e2e import Agent, connect

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def passfd_agent():
    workdir = tempfile.mkdtemp(prefix="kag-", dir="/tmp")
    listen = os.path.join(workdir, "passfd.sock")
    agent = Agent(workdir, f"agent.passfd_listener_addr=unix://{listen} agent.container_pipe_size=1048576")
    agent.passfd_path = listen
    try:
        yield agent
    finally:
        rc = agent.stop()
        log = agent.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert rc == 0, log[-3000:]
        assert '"level":"error"' not in log, log[-3000:]


_next_port = iter(range(20000 + os.getpid() % 10000 * 4, 1 << 30))


async def host_stream(agent: Agent) -> tuple[socket.socket, int]:
    port = next(_next_port)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0kagent-passfd-test-{os.getpid()}.{port}")
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, agent.passfd_path)
    return s, port


async def recv_all(s: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(s, MiB):
        chunks.append(data)
    return b"".join(chunks)


def _received_now(s: socket.socket) -> bytes:
    """What the socket holds, which must end with the peer's close: no byte may still be due."""
    chunks = []
    while True:
        try:
            data = s.recv(MiB)
        except BlockingIOError:
            raise AssertionError(f"the stream is still open after {b''.join(chunks)!r}") from None
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def _running(calls, rootfs: str, cid: str = "c1") -> None:
    await calls.create(cid, devtools.default_spec(rootfs, ["/bin/sleep", "1000"]))
    await calls.StartContainer(container_id=cid)


async def test_exec_streams_stdin_to_stdout_and_the_exit_waits_for_the_output(passfd_agent, rootfs):
    calls = await connect(passfd_agent)
    try:
        await _running(calls, rootfs)
        (h_in, p_in), (h_out, p_out), (h_err, p_err) = [await host_stream(passfd_agent) for _ in range(3)]
        proc = devtools.default_spec(rootfs, ["/bin/cat"])["process"]
        await calls.ExecProcess(container_id="c1", exec_id="cat", process=oci.process_from_dict(proc),
                                stdin_port=p_in, stdout_port=p_out, stderr_port=p_err)
        # The RPCs must not race the pumps: they refuse a stdio that goes to a stream.
        for rpc, fields in (("ReadStdout", {"len": 10}), ("ReadStderr", {"len": 10}),
                            ("WriteStdin", {"data": b"x"}), ("CloseStdin", {})):
            with pytest.raises(RpcError) as err:
                await getattr(calls, rpc)(container_id="c1", exec_id="cat", **fields)
            assert err.value.code == Code.FAILED_PRECONDITION and "direct stream" in err.value.message
        data = os.urandom(8 * MiB + 17)
        reader = asyncio.create_task(recv_all(h_out))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(h_in, data)
        h_in.shutdown(socket.SHUT_WR)  # end of input: cat's stdin is closed
        status = await calls.WaitProcess(container_id="c1", exec_id="cat", timeout=30)
        assert status.status == 0
        got = await asyncio.wait_for(reader, 5)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest() and len(got) == len(data)
        assert await asyncio.wait_for(recv_all(h_err), 5) == b""
        for s in (h_in, h_out, h_err):
            s.close()
        await calls.RemoveContainer(container_id="c1")
    finally:
        await calls.client.close()


async def test_container_init_output_and_status_through_streams(passfd_agent, rootfs):
    calls = await connect(passfd_agent)
    try:
        (h_out, p_out), (h_err, p_err) = [await host_stream(passfd_agent) for _ in range(2)]
        # Less than the pipe holds (1 MiB), more than the socket does: the init exits while
        # its output still waits for the pump.
        script = "head -c 786432 /dev/zero; echo to-err >&2; exit 3"
        await calls.create("c2", devtools.default_spec(rootfs, ["/bin/sh", "-c", script]),
                           stdout_port=p_out, stderr_port=p_err)
        await calls.StartContainer(container_id="c2")
        # While the host has not read the output, the exit is not published (as upstream).
        with pytest.raises(RpcError) as err:
            await calls.WaitProcess(container_id="c2", exec_id="c2", timeout=1)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        out = asyncio.create_task(recv_all(h_out))
        assert (await calls.WaitProcess(container_id="c2", exec_id="c2", timeout=30)).status == 3
        assert await asyncio.wait_for(out, 5) == bytes(786432)
        # The pumps finished before the exit was published: the stderr stream has ended already.
        assert _received_now(h_err) == b"to-err\n"
        await calls.RemoveContainer(container_id="c2")
        h_out.close()
        h_err.close()
    finally:
        await calls.client.close()


async def test_terminal_exec_through_a_stream(passfd_agent, rootfs):
    calls = await connect(passfd_agent)
    try:
        await _running(calls, rootfs)
        (h_in, p_in), (h_out, p_out) = [await host_stream(passfd_agent) for _ in range(2)]
        proc = devtools.default_spec(rootfs, ["/bin/sh", "-c", "read line; echo got:$line"])["process"]
        proc["terminal"] = True
        await calls.ExecProcess(container_id="c1", exec_id="tty", process=oci.process_from_dict(proc),
                                stdin_port=p_in, stdout_port=p_out)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(h_in, b"hello\n")
        assert (await calls.WaitProcess(container_id="c1", exec_id="tty", timeout=30)).status == 0
        out = await asyncio.wait_for(recv_all(h_out), 5)
        assert b"got:hello" in out, out
        h_in.close()
        h_out.close()
        await calls.RemoveContainer(container_id="c1")
    finally:
        await calls.client.close()


async def test_a_missing_stream_fails_before_anything_runs(passfd_agent, rootfs):
    calls = await connect(passfd_agent)
    try:
        await _running(calls, rootfs)
        h_out, p_out = await host_stream(passfd_agent)
        proc = oci.process_from_dict(devtools.default_spec(rootfs, ["/bin/echo", "ran"])["process"])
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="c1", exec_id="e1", process=proc, stdout_port=p_out,
                                    stderr_port=p_out + 100000)
        assert err.value.code == Code.NOT_FOUND and str(p_out + 100000) in err.value.message
        # Nothing ran, the exec id is free, and the stream that did arrive was given back.
        assert await asyncio.wait_for(recv_all(h_out), 5) == b""
        with pytest.raises(RpcError) as err:
            await calls.WaitProcess(container_id="c1", exec_id="e1")
        assert err.value.code == Code.NOT_FOUND
        await calls.ExecProcess(container_id="c1", exec_id="e1", process=proc)
        assert await calls.read_all("c1", "e1") == b"ran\n"
        assert (await calls.WaitProcess(container_id="c1", exec_id="e1")).status == 0
        # CreateContainer: the same, and no container is left.
        with pytest.raises(RpcError) as err:
            await calls.create("c3", devtools.default_spec(rootfs, ["/bin/true"]), stdout_port=p_out + 200000)
        assert err.value.code == Code.NOT_FOUND
        await calls.create("c3", devtools.default_spec(rootfs, ["/bin/true"]))
        await calls.RemoveContainer(container_id="c3")
        await calls.RemoveContainer(container_id="c1")
        h_out.close()
    finally:
        await calls.client.close()


async def test_ports_without_a_listener_are_refused(agent, rootfs):
    calls = await connect(agent)
    try:
        with pytest.raises(RpcError) as err:
            await calls.create("c1", devtools.default_spec(rootfs, ["/bin/true"]), stdout_port=1234)
        assert err.value.code == Code.FAILED_PRECONDITION and "passfd_listener_port" in err.value.message
        await calls.create("c1", devtools.default_spec(rootfs, ["/bin/true"]))
        await calls.RemoveContainer(container_id="c1")
    finally:
        await calls.client.close()
