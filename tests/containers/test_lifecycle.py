"""The host's container life cycle (reference §1.3) through ttRPC, on real containers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import pytest
from e2e import Agent, connect

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


def spec_for(rootfs: str, script: str, **kw) -> dict:
    return devtools.default_spec(rootfs, ["/bin/sh", "-c", script], **kw)


async def test_output_exit_code_and_cleanup(agent, rootfs):
    calls = await connect(agent)
    status, out, err = await calls.run("c1", spec_for(rootfs, "echo hello; echo oops >&2; hostname; exit 3"))
    assert (status, out, err) == (3, b"hello\nctr\n", b"oops\n")
    assert not os.path.exists(os.path.join(agent.run_dir, "c1")), "bundle left behind"


def without_pid_ns(spec: dict) -> dict:
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    return spec


async def test_exit_by_signal_is_128_plus_signal(agent, rootfs):
    calls = await connect(agent)
    # Not a pid-namespace init (which would be immune to its own SEGV): dies of the signal.
    status, _, _ = await calls.run("c1", without_pid_ns(spec_for(rootfs, "kill -SEGV $$")))
    assert status == 128 + signal.SIGSEGV
    await calls.create("c2", spec_for(rootfs, "sleep 1000"))
    await calls.StartContainer(container_id="c2")
    await calls.ExecProcess(container_id="c2", exec_id="e1", process=oci.process_from_dict(
        {"args": ["/bin/sleep", "1000"], "cwd": "/"}))
    await calls.SignalProcess(container_id="c2", exec_id="e1", signal=signal.SIGUSR1)
    assert (await calls.WaitProcess(container_id="c2", exec_id="e1")).status == 128 + signal.SIGUSR1
    await calls.RemoveContainer(container_id="c2")


async def test_exec_with_its_own_user_env_and_cwd(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000"))
    await calls.StartContainer(container_id="c1")
    process = {"args": ["/bin/sh", "-c", "id -u; id -g; echo $GREETING; pwd"], "env": ["GREETING=hi",
               "PATH=/bin"], "cwd": "/home/app", "user": {"uid": 1000, "gid": 1000}}
    await calls.ExecProcess(container_id="c1", exec_id="e1", process=oci.process_from_dict(process))
    out = await calls.read_all("c1", "e1")
    status = await calls.WaitProcess(container_id="c1", exec_id="e1")
    assert status.status == 0
    assert out == b"1000\n1000\nhi\n/home/app\n"
    # string_user: names resolved in the container's own /etc/passwd and /etc/group
    await calls.ExecProcess(container_id="c1", exec_id="e2", string_user={"uid": "app", "gid": "wheel"},
                            process=oci.process_from_dict({"args": ["/bin/id"], "cwd": "/"}))
    assert b"uid=1000(app) gid=10(wheel)" in await calls.read_all("c1", "e2")
    assert (await calls.WaitProcess(container_id="c1", exec_id="e2")).status == 0
    with pytest.raises(RpcError) as err:
        await calls.WaitProcess(container_id="c1", exec_id="e1")
    assert err.value.code == Code.NOT_FOUND  # waited-for processes leave the table
    await calls.RemoveContainer(container_id="c1")


async def test_stdin_round_trip_through_cat(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "cat"))
    await calls.StartContainer(container_id="c1")
    payload = os.urandom(300_000)
    reader = asyncio.create_task(calls.read_all("c1", "c1"))
    for i in range(0, len(payload), 65536):
        r = await calls.WriteStdin(container_id="c1", exec_id="c1", data=payload[i:i + 65536])
        assert r.len == len(payload[i:i + 65536])
    await calls.CloseStdin(container_id="c1", exec_id="c1")
    assert await reader == payload
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
    await calls.RemoveContainer(container_id="c1")


async def test_write_stdin_empty_data_closes_stdin(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "wc -c"))
    await calls.StartContainer(container_id="c1")
    await calls.WriteStdin(container_id="c1", exec_id="c1", data=b"12345")
    await calls.WriteStdin(container_id="c1", exec_id="c1", data=b"")
    assert (await calls.read_all("c1", "c1")).strip() == b"5"
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
    await calls.RemoveContainer(container_id="c1")


async def test_tty_process_with_window_resize(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000"))
    await calls.StartContainer(container_id="c1")
    process = {"terminal": True, "args": ["/bin/sh"], "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/"}
    await calls.ExecProcess(container_id="c1", exec_id="t1", process=oci.process_from_dict(process))
    await calls.TtyWinResize(container_id="c1", exec_id="t1", row=40, column=123)
    await calls.WriteStdin(container_id="c1", exec_id="t1", data=b"stty size; tty; exit 7\n")
    out = await calls.read_all("c1", "t1")
    assert b"40 123" in out
    assert b"/dev/pts/0" in out, "the tty must be the container's own /dev/pts entry"
    assert (await calls.WaitProcess(container_id="c1", exec_id="t1")).status == 7
    with pytest.raises(RpcError) as err:  # a process without a tty
        await calls.ExecProcess(container_id="c1", exec_id="p1", process=oci.process_from_dict(
            {"args": ["/bin/sleep", "5"], "cwd": "/"}))
        await calls.TtyWinResize(container_id="c1", exec_id="p1", row=1, column=1)
    assert err.value.code == Code.UNAVAILABLE
    await calls.RemoveContainer(container_id="c1")


async def test_100mb_of_output_read_back_whole(agent, rootfs):
    calls = await connect(agent)
    size = 100 * 1024 * 1024
    # Deterministic content: 100 MiB of a repeated 1 KiB line pattern with a counter.
    script = "i=0; while [ $i -lt 102400 ]; do printf '%01023d\\n' $i; i=$((i+1)); done"
    await calls.create("c1", spec_for(rootfs, script))
    await calls.StartContainer(container_id="c1")
    digest = hashlib.sha256()
    total = 0
    while True:
        r = await calls.ReadStdout(container_id="c1", exec_id="c1", len=1 << 20, timeout=None)
        if not r.data:
            break
        digest.update(r.data)
        total += len(r.data)
    status = await calls.WaitProcess(container_id="c1", exec_id="c1")
    expected = hashlib.sha256(b"".join(b"%01023d\n" % i for i in range(102400))).hexdigest()
    assert (status.status, total, digest.hexdigest()) == (0, size, expected)
    await calls.RemoveContainer(container_id="c1")


async def test_host_that_does_not_read_only_blocks_the_writer(agent, rootfs):
    import psutil

    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "yes flood"))
    await calls.StartContainer(container_id="c1")
    rss = [psutil.Process(agent.proc.pid).memory_info().rss]
    for _ in range(5):
        await asyncio.sleep(0.2)
        rss.append(psutil.Process(agent.proc.pid).memory_info().rss)
    assert max(rss) - rss[0] < 4 << 20, rss  # nothing is buffered in the agent
    r = await calls.ReadStdout(container_id="c1", exec_id="c1", len=1024)
    assert r.data.startswith(b"flood\n")
    await calls.SignalProcess(container_id="c1", exec_id="", signal=signal.SIGKILL)
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 137
    await calls.RemoveContainer(container_id="c1")


async def test_kill_all_and_sigterm_to_init_without_handler(agent, rootfs):
    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000 & sleep 1000 & wait"))
    await calls.StartContainer(container_id="c1")
    await calls.ExecProcess(container_id="c1", exec_id="e1", process=oci.process_from_dict(
        {"args": ["/bin/sleep", "1000"], "cwd": "/"}))
    await calls.SignalProcess(container_id="c1", exec_id="", signal=signal.SIGKILL)
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 137
    assert (await calls.WaitProcess(container_id="c1", exec_id="e1")).status == 137
    await calls.RemoveContainer(container_id="c1")
    # sh as pid-namespace init has no SIGTERM handler: the agent turns SIGTERM into SIGKILL
    await calls.create("c2", devtools.default_spec(rootfs, ["/bin/sleep", "1000"]))
    await calls.StartContainer(container_id="c2")
    await calls.SignalProcess(container_id="c2", exec_id="c2", signal=signal.SIGTERM)
    assert (await calls.WaitProcess(container_id="c2", exec_id="c2", timeout=10)).status == 137
    await calls.RemoveContainer(container_id="c2")


async def test_output_after_exit_from_a_lingering_child_then_eof(agent, rootfs):
    """A background child keeps the pipe open after the init exits: reads still get what
    was written, then EOF within the drain window (not a hang)."""
    calls = await connect(agent)
    spec = without_pid_ns(spec_for(rootfs, "echo first; (sleep 30; echo late) & exit 0"))
    await calls.create("c1", spec)
    await calls.StartContainer(container_id="c1")
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await calls.read_all("c1", "c1") == b"first\n"
    assert loop.time() - started < 5
    await calls.RemoveContainer(container_id="c1")


async def test_invalid_ids_and_specs_are_refused(agent, rootfs):
    calls = await connect(agent)
    for bad in ("../escape", "", "a", "-x", "a/b", "x" * 300):
        with pytest.raises(RpcError) as err:
            await calls.create(bad, spec_for(rootfs, "true"))
        assert err.value.code == Code.INVALID_ARGUMENT, bad
    with pytest.raises(RpcError) as err:
        await calls.create("c1", {"ociVersion": "1.0.2", "root": {"path": rootfs}})
    assert err.value.code == Code.INVALID_ARGUMENT and "process.args" in err.value.message
    bad_mount = spec_for(rootfs, "true")
    bad_mount["mounts"].append({"destination": "/data", "type": "bind", "source": "/nonexistent/dir",
                                "options": ["rbind"]})
    with pytest.raises(RpcError) as err:
        await calls.create("c2", bad_mount)
    assert "/nonexistent/dir" in err.value.message or "/data" in err.value.message
    assert not os.path.exists(os.path.join(agent.run_dir, "c2"))
    await calls.create("c3", spec_for(rootfs, "true"))
    with pytest.raises(RpcError) as err:
        await calls.create("c3", spec_for(rootfs, "true"))
    assert err.value.code == Code.ALREADY_EXISTS
    with pytest.raises(RpcError) as err:
        await calls.StartContainer(container_id="nope")
    assert err.value.code == Code.NOT_FOUND
    with pytest.raises(RpcError) as err:
        await calls.ExecProcess(container_id="c3", exec_id="../x", process=oci.process_from_dict({"args": ["/bin/true"]}))
    assert err.value.code == Code.INVALID_ARGUMENT
    await calls.RemoveContainer(container_id="c3")


async def test_worker_killed_while_container_runs(agent, rootfs):
    import psutil

    calls = await connect(agent)
    await calls.create("c1", spec_for(rootfs, "sleep 1000"))
    await calls.StartContainer(container_id="c1")
    waiter = asyncio.create_task(calls.WaitProcess(container_id="c1", exec_id="c1", timeout=None))
    workers = [p for p in psutil.Process(agent.proc.pid).children(recursive=True)
               if p.cmdline()[:1] == ["kagent: worker c1"]]
    assert len(workers) == 1
    init = [p for p in workers[0].children() if p.name() == "sleep"]
    os.kill(workers[0].pid, signal.SIGKILL)
    assert (await waiter).status == 137
    for p in init:
        p.wait(5)  # killed through its pidfd
    await calls.RemoveContainer(container_id="c1")
    await calls.create("c2", spec_for(rootfs, "echo alive"))  # and the agent goes on
    await calls.StartContainer(container_id="c2")
    assert await calls.read_all("c2", "c2") == b"alive\n"
    assert (await calls.WaitProcess(container_id="c2", exec_id="c2")).status == 0
    await calls.RemoveContainer(container_id="c2")


async def test_nothing_left_behind_after_remove(agent, rootfs):
    import psutil

    calls = await connect(agent)
    me = psutil.Process(agent.proc.pid)
    status, _, _ = await calls.run("warm", spec_for(rootfs, "true"))
    fds_before = me.num_fds()
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    for i in range(3):
        await calls.create(f"c{i}", spec_for(rootfs, "sleep 1000"))
        await calls.StartContainer(container_id=f"c{i}")
        await calls.ExecProcess(container_id=f"c{i}", exec_id="e", process=oci.process_from_dict(
            {"args": ["/bin/sleep", "1000"], "cwd": "/"}))
    for i in range(3):
        await calls.RemoveContainer(container_id=f"c{i}")
    await asyncio.sleep(0.2)
    assert me.num_fds() == fds_before
    names = [" ".join(p.cmdline()).strip() for p in me.children(recursive=True)]
    assert names == ["kagent: zygote"], names
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before
    assert os.listdir(agent.run_dir) == []


async def test_pipe_size_lets_a_writer_finish_without_a_reader(rootfs, tmp_sock_dir):
    for cmdline, finishes in (("agent.container_pipe_size=1048576", True), ("quiet", False)):
        agent = Agent(tmp_sock_dir, cmdline)
        try:
            calls = await connect(agent)
            # 1 MiB into stdout with nobody reading: fits a 1 MiB pipe, blocks a 64 KiB one.
            await calls.create("c1", spec_for(rootfs, "head -c 1048576 /dev/zero"))
            await calls.StartContainer(container_id="c1")
            try:
                status = await calls.WaitProcess(container_id="c1", exec_id="c1", timeout=2)
                assert finishes and status.status == 0
            except RpcError as exc:
                assert not finishes and exc.code == Code.DEADLINE_EXCEEDED
            assert len(await calls.read_all("c1", "c1", size=1 << 20)) == 1 << 20
            await calls.RemoveContainer(container_id="c1")
            await calls.client.close()
        finally:
            assert agent.stop() == 0


async def test_pipe_size_above_the_limit_is_a_clear_error(rootfs, tmp_sock_dir):
    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    agent = Agent(tmp_sock_dir, f"agent.container_pipe_size={limit * 2}")
    try:
        calls = await connect(agent)
        with pytest.raises(RpcError) as err:
            await calls.create("c1", spec_for(rootfs, "true"))
        assert "pipe-max-size" in err.value.message and str(limit * 2) in err.value.message
    finally:
        assert agent.stop() == 0


async def test_orphans_are_reaped_not_left_as_zombies(agent, rootfs):
    """Without a pid namespace of its own, a container's orphans are re-parented to its
    worker (a child subreaper), which must reap them."""
    calls = await connect(agent)
    await calls.create("c1", without_pid_ns(spec_for(rootfs, "sleep 1000")))
    await calls.StartContainer(container_id="c1")
    await calls.ExecProcess(container_id="c1", exec_id="e1", process=oci.process_from_dict(
        {"args": ["/bin/sh", "-c", "sleep 0.3 & echo $!"], "cwd": "/"}))
    orphan = int((await calls.read_all("c1", "e1")).strip())
    assert (await calls.WaitProcess(container_id="c1", exec_id="e1")).status == 0
    for _ in range(200):  # sleep 0.3 s, then the worker has to reap it (a zombie stays in /proc)
        if not os.path.exists(f"/proc/{orphan}"):
            break
        await asyncio.sleep(0.01)
    assert not os.path.exists(f"/proc/{orphan}"), "orphan not reaped (a zombie)"
    await calls.RemoveContainer(container_id="c1")


async def test_devices_get_the_guests_major_minor(agent, rootfs, tmp_path):
    """A block device the host names by its guest path (mmioblk): the container's device node
    gets the real major/minor, whatever numbers the host put in the spec."""
    import subprocess

    backing = tmp_path / "disk.img"
    backing.write_bytes(b"\0" * (1 << 20))
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    node = loop.stdout.strip()
    try:
        st = os.stat(node)
        calls = await connect(agent)
        spec = spec_for(rootfs, "ls -l /dev/xda")
        spec["linux"]["devices"] = [{"path": "/dev/xda", "type": "b", "major": 250, "minor": 9, "fileMode": 0o660}]
        await calls.CreateContainer(container_id="c1", exec_id="c1", OCI=oci.spec_from_dict(spec), devices=[
            {"type": "mmioblk", "vm_path": node, "container_path": "/dev/xda"}])
        await calls.StartContainer(container_id="c1")
        out = await calls.read_all("c1", "c1")
        assert f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev):>3}".encode() in out or \
            f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}".encode() in out.replace(b" ", b""), out
        assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
        await calls.RemoveContainer(container_id="c1")
    finally:
        subprocess.run(["losetup", "-d", node], check=False)


async def test_specs_larger_than_a_socket_record(agent, rootfs):
    """A spec (and an exec's process) of hundreds of KiB, as big environments and annotations
    make them: more than one SEQPACKET record to the worker may hold (it goes in a memfd)."""
    calls = await connect(agent)
    env = ["PATH=/bin"] + [f"BIG{i}={'v' * 1000}" for i in range(300)]
    spec = spec_for(rootfs, 'echo ${#BIG299}; env | grep -c ^BIG')
    spec["process"]["env"] = env
    spec["annotations"] = {"io.kagent.test/blob": "a" * (600 << 10)}
    await calls.create("c1", spec)
    await calls.StartContainer(container_id="c1")
    assert await calls.read_all("c1", "c1") == b"1000\n300\n"
    assert (await calls.WaitProcess(container_id="c1", exec_id="c1")).status == 0
    await calls.RemoveContainer(container_id="c1")

    await calls.create("c2", spec_for(rootfs, "sleep 100"))
    await calls.StartContainer(container_id="c2")
    process = {"args": ["/bin/sh", "-c", "env | grep -c ^BIG"], "cwd": "/", "env": env}
    await calls.ExecProcess(container_id="c2", exec_id="e1", process=oci.process_from_dict(process))
    assert await calls.read_all("c2", "e1") == b"300\n"
    assert (await calls.WaitProcess(container_id="c2", exec_id="e1")).status == 0
    await calls.SignalProcess(container_id="c2", exec_id="c2", signal=9)
    await calls.WaitProcess(container_id="c2", exec_id="c2")
    await calls.RemoveContainer(container_id="c2")
