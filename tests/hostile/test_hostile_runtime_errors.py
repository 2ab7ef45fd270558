"""The host's mistakes that the kernel finds (a mount option, a program or a path that is not
there) are INVALID_ARGUMENT naming what and why; a container process that dies before its exec
without a word fails its RPC (CreateContainer, StartContainer or ExecProcess), says how it
ended, and leaves nothing the host could wait on forever (tests/fuzz/FINDINGS.md).

kagent resolves process.args[0] when the process is set up: for the init that is at
CreateContainer (the init then waits for StartContainer with everything checked), for an exec
at ExecProcess.  StartContainer only meets what execve alone can tell (a file that is not a
program the kernel runs): INVALID_ARGUMENT too, and the init is reported exited.
Runs on a sandboxed agent."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import reliability_harness as harness

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root

SIGSYS = 31
NOT_A_PROGRAM = "/not-a-program"  # mode 755, no ELF header, no #!: execve says ENOEXEC


@pytest.fixture(scope="module")
def agent():
    with harness.busybox_agent(sandboxed=True) as a:
        with open(a.rootfs + NOT_A_PROGRAM, "w") as f:
            f.write("plain text\n")
        os.chmod(a.rootfs + NOT_A_PROGRAM, 0o755)
        harness.run(a.wait_ready())
        harness.run(_warm_up(a))
        a.baseline = _quiet_snapshot(a)
        yield a


async def _warm_up(agent) -> None:
    """One container through create, start, exec and removal: pools and workers started once."""
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("w1", devtools.default_spec(agent.rootfs, ["/bin/sleep", "100"]))
        await calls.StartContainer(container_id="w1")
        await calls.ExecProcess(container_id="w1", exec_id="e1", process=_process(["/bin/true"]))
        await calls.WaitProcess(container_id="w1", exec_id="e1")
        await calls.RemoveContainer(container_id="w1")
    finally:
        await calls.client.close()


def _quiet_snapshot(agent) -> harness.Snapshot:
    """The baseline once the warm-up's worker is gone (an exiting one shows with no cmdline)."""
    for _ in range(100):
        snap = agent.snapshot()
        if all(c and not c.startswith("<zombie") for c in snap.children):
            return snap
        time.sleep(0.05)
    return snap


async def _left_nothing(agent) -> None:
    problems = await harness.settle(agent, agent.baseline, timeout=10)
    assert problems == [], problems
    assert os.listdir(agent.run_dir) == []


def _process(args: list[str], **fields) -> object:
    return oci.process_from_dict({"args": args, "cwd": "/", "env": ["PATH=/bin"], **fields})


def _spec(agent, args=("/bin/true",)) -> dict:
    return devtools.default_spec(agent.rootfs, list(args))


def _seccomp_kill(name: str, **arg) -> dict:
    rule = {"names": [name], "action": "SCMP_ACT_KILL"}
    if arg:
        rule["args"] = [{"op": "SCMP_CMP_EQ", **arg}]
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}


def _no_core(spec: dict) -> None:
    spec["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]  # a SIGSYS dumps


async def _create_error(agent, spec: dict) -> RpcError:
    calls = harness.Calls(await agent.connect())
    try:
        with pytest.raises(RpcError) as err:
            await calls.create("h1", spec)
        return err.value
    finally:
        await calls.client.close()


# --- CreateContainer: what the kernel refuses in the spec -----------------------------------


def _mount(**m):
    def edit(spec, agent):
        spec["mounts"].append({"destination": "/mnt", **m})
    return edit


def _root(path):
    def edit(spec, agent):
        spec["root"]["path"] = path if not path.startswith("@") else os.path.join(agent.workdir, path[1:])
    return edit


def _args(*args):
    def edit(spec, agent):
        spec["process"]["args"] = list(args)
    return edit


def _cwd(spec, agent):
    spec["process"]["cwd"] = "/no/such/dir"


def _sysctl(spec, agent):
    spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": "99999999999999999999"}


def _long_hostname(spec, agent):
    spec["hostname"] = "h" * 100


def _device(path):
    def edit(spec, agent):
        spec["linux"].setdefault("devices", []).append({"path": path, "type": "c", "major": 1, "minor": 3})
    return edit


def _not_a_namespace(spec, agent):
    ipc = next(n for n in spec["linux"]["namespaces"] if n["type"] == "ipc")
    ipc["path"] = os.path.join(agent.workdir, "agent.log")


CREATE_CASES = {  # edit, what the message names (in order)
    "tmpfs option": (_mount(type="tmpfs", source="tmpfs", options=["size=-1m"]),
                     ["mount tmpfs at ", "/mnt with size=-1m", "[Errno 22] Invalid argument"]),
    "tmpfs mode": (_mount(type="tmpfs", source="tmpfs", options=["mode=bogus"]),
                   ["/mnt with mode=bogus", "Invalid argument"]),
    "unknown fs type": (_mount(type="kagentfs", source="none"),
                        ["mount kagentfs at ", "/mnt", "[Errno 19] No such device"]),
    "missing bind source": (_mount(type="bind", source="/no/such/src", options=["rbind"]),
                            ["mount bind /no/such/src at ", "/mnt", "No such file or directory"]),
    "missing root.path": (_root("@nope/rootfs"), ["root.path ", "/nope/rootfs", "No such file or directory"]),
    "relative root.path": (_root("nope"), ["root.path nope", "No such file or directory", "/nope'"]),
    "root.path a file": (_root("@agent.log"), ["root.path ", "agent.log", "[Errno 20] Not a directory"]),
    "missing program": (_args("/nonexistent"), ["exec /nonexistent: [Errno 2] No such file or directory"]),
    "program not in PATH": (_args("no-such-program"),
                            ["exec no-such-program: executable file not found in $PATH"]),
    "not executable": (_args("/etc/passwd"), ["exec /etc/passwd: [Errno 13] Permission denied"]),
    "a directory": (_args("/bin"), ["exec /bin: [Errno 13] Permission denied"]),
    "missing cwd": (_cwd, ["chdir /no/such/dir: [Errno 2] No such file or directory"]),
    "mount on a file": (_mount(destination="/etc/passwd", type="tmpfs", source="tmpfs"),
                        ["mount tmpfs at ", "/etc/passwd: create mount point: [Errno 17] File exists"]),
    "root.path is /": (_root("/"), ["spec: root.path / is the guest's own root"]),
    "sysctl value": (_sysctl, ["sysctl net.ipv4.ip_forward=99999999999999999999: [Errno 22] Invalid argument"]),
    "hostname too long": (_long_hostname, ["set hostname 'hhh", "[Errno 22] Invalid argument"]),
    "not a namespace": (_not_a_namespace, ["join ipc namespace ", "agent.log: [Errno 22] Invalid argument"]),
    "NUL in a mount destination": (_mount(destination="/a\x00b", type="tmpfs", source="tmpfs"),
                                   ["spec: mounts[", "].destination contains a NUL byte"]),
    "NUL in root.path": (_root("/a\x00b"), ["spec: root.path contains a NUL byte"]),
    # make fuzz: ENAMETOOLONG while resolving these in the rootfs was INTERNAL
    "mount destination over NAME_MAX": (_mount(destination="/" + "a" * 300, type="tmpfs", source="tmpfs"),
                                        ["path '/aaa", "File name too long"]),
    "device path over NAME_MAX": (_device("/dev/" + "d" * 300), ["path '/dev/ddd", "File name too long"]),
}


@pytest.mark.parametrize("edit,named", CREATE_CASES.values(), ids=CREATE_CASES.keys())
async def test_specs_the_kernel_refuses_are_invalid_argument(agent, edit, named):
    """OCI fuzz finding: these were INTERNAL (mount EINVAL/ENODEV, a missing bind source,
    root.path or cwd, "ValueError: embedded null byte"), or, for a program that is not there,
    the right words with the wrong code."""
    spec = _spec(agent)
    edit(spec, agent)
    err = await _create_error(agent, spec)
    assert err.code == Code.INVALID_ARGUMENT, err
    at = 0
    for part in named:
        found = err.message.find(part, at)
        assert found >= 0, (part, err.message)
        at = found + len(part)
    await _left_nothing(agent)


async def test_an_rlimit_the_kernel_refuses_is_a_clear_error(agent):
    """OCI fuzz finding: "set-up: ValueError: not allowed to raise maximum limit" (how Python's
    resource module reports EPERM).  The step and errno instead; INTERNAL, as the guest may
    just lack CAP_SYS_RESOURCE (a hard RLIMIT_NOFILE above fs.nr_open is EPERM even with it)."""
    spec = _spec(agent)
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2**40}]
    err = await _create_error(agent, spec)
    assert err.message == (f"create container h1: set RLIMIT_NOFILE soft=1024 hard={2**40}: "
                           "[Errno 1] Operation not permitted"), err
    await _left_nothing(agent)


# --- StartContainer -------------------------------------------------------------------------


async def test_start_of_a_file_execve_refuses_is_invalid_argument(agent):
    """Only execve knows that a file with an x bit is no program: StartContainer answers it,
    naming the file and the kernel's reason; the init is reported exited (status 1, it wrote
    the error), and the container can be removed."""
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("s1", _spec(agent, [NOT_A_PROGRAM]))
        with pytest.raises(RpcError) as err:
            await calls.StartContainer(container_id="s1")
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
        assert f"exec {NOT_A_PROGRAM}: [Errno 8] Exec format error" in err.value.message, err.value
        assert (await calls.WaitProcess(container_id="s1", exec_id="s1", timeout=5)).status == 1
    finally:
        await calls.RemoveContainer(container_id="s1")
        await calls.client.close()
    await _left_nothing(agent)


async def test_start_of_an_init_that_dies_before_exec_fails(agent):
    """Finding: an init that died between StartContainer's go-ahead and its exec, without a word
    (here the container's seccomp profile kills the close_range before execve), was reported
    started.  Now StartContainer fails saying how it ended, WaitProcess returns its status at
    once (128 + SIGSYS), and nothing is left.  A SIGSYS before exec is the spec's own seccomp
    filter at work: INVALID_ARGUMENT (make fuzz: it was INTERNAL)."""
    spec = _spec(agent)
    _no_core(spec)
    spec["linux"]["seccomp"] = _seccomp_kill("close_range")
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("d1", spec)
        with pytest.raises(RpcError) as err:
            await calls.StartContainer(container_id="d1")
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
        assert err.value.message == ("start container d1: start: the container init died before its "
                                     f"exec (killed by signal {SIGSYS} (SIGSYS)): the spec's seccomp "
                                     "filter kills a system call that the set-up or the exec needs"), err.value
        assert (await calls.WaitProcess(container_id="d1", exec_id="d1", timeout=5)).status == 128 + SIGSYS
        with pytest.raises(RpcError) as again:
            await calls.StartContainer(container_id="d1")
        assert again.value.code == Code.FAILED_PRECONDITION, again.value
    finally:
        await calls.RemoveContainer(container_id="d1")
        await calls.client.close()
    await _left_nothing(agent)


async def test_an_init_oom_killed_before_exec_names_the_memory_limit(agent):
    """make fuzz: a memory limit too low for the set-up (its pages are the container's) got
    the init OOM-killed before its exec, answered INTERNAL "killed by signal 9".  The worker
    sees the cgroup's OOM kill: INVALID_ARGUMENT naming the limit; nothing is left.  (256 KiB:
    a 1 MiB limit is at the edge, the set-up sometimes fits in it.)"""
    spec = _spec(agent)
    spec["linux"]["resources"] = {"memory": {"limit": 256 << 10, "swap": 256 << 10}}
    calls = harness.Calls(await agent.connect())
    try:
        try:
            await calls.create("m1", spec)
            await calls.StartContainer(container_id="m1")
        except RpcError as exc:
            err = exc
        else:
            pytest.fail("a container limited to 256 KiB started")
        assert err.code == Code.INVALID_ARGUMENT, err
        assert "killed by signal 9 (SIGKILL)): OOM-killed, the container's memory limit " \
               "(linux.resources.memory.limit 262144) is too low for its set-up" in err.message, err
    finally:
        with contextlib.suppress(RpcError):
            await calls.RemoveContainer(container_id="m1")
        await calls.client.close()
    await _left_nothing(agent)


# --- ExecProcess ----------------------------------------------------------------------------


EXEC_CASES = {
    "missing program": (["/nonexistent"], "exec /nonexistent: [Errno 2] No such file or directory"),
    "program not in PATH": (["no-such-program"], "exec no-such-program: executable file not found in $PATH"),
    "not executable": (["/etc/passwd"], "exec /etc/passwd: [Errno 13] Permission denied"),
    "not a program": ([NOT_A_PROGRAM], f"exec {NOT_A_PROGRAM}: [Errno 8] Exec format error"),
}


@pytest.mark.parametrize("args,named", EXEC_CASES.values(), ids=EXEC_CASES.keys())
async def test_exec_of_what_cannot_run_is_invalid_argument(agent, args, named):
    """OCI fuzz finding (process.args[0] = /nonexistent): INTERNAL.  INVALID_ARGUMENT naming the
    binary and the kernel's reason; no process entry is made, the container goes on."""
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("r1", _spec(agent, ["/bin/sleep", "100"]))
        await calls.StartContainer(container_id="r1")
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="r1", exec_id="x1", process=_process(args))
        assert err.value.code == Code.INVALID_ARGUMENT and named in err.value.message, err.value
        await _left_no_process_entry(calls, "r1", "x1")
    finally:
        await calls.RemoveContainer(container_id="r1")
        await calls.client.close()
    await _left_nothing(agent)


async def _left_no_process_entry(calls, cid: str, exec_id: str) -> None:
    """After a failed ExecProcess: nothing to wait for under its id, and the id works again."""
    with pytest.raises(RpcError) as gone:
        await calls.WaitProcess(container_id=cid, exec_id=exec_id, timeout=5)
    assert gone.value.code == Code.NOT_FOUND, gone.value
    await calls.ExecProcess(container_id=cid, exec_id=exec_id, process=_process(["/bin/true"]))
    assert (await calls.WaitProcess(container_id=cid, exec_id=exec_id, timeout=5)).status == 0


async def test_exec_of_a_process_that_dies_before_exec_fails(agent):
    """Finding: an exec'd process that died in its set-up without a word (the container's
    seccomp profile kills the switch to uid 1000) was reported as running.  Now ExecProcess
    fails saying how it ended, no process entry is left to wait on, and the container goes on."""
    spec = _spec(agent, ["/bin/sleep", "100"])
    _no_core(spec)
    spec["linux"]["seccomp"] = _seccomp_kill("setresuid", index=0, value=1000)
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("d2", spec)
        await calls.StartContainer(container_id="d2")
        doomed = _process(["/bin/true"], user={"uid": 1000, "gid": 1000},
                          noNewPrivileges=False)  # its filter is loaded before the user switch
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="d2", exec_id="x1", process=doomed)
        assert err.value.code == Code.INVALID_ARGUMENT, err.value  # the spec's filter (make fuzz)
        assert err.value.message == ("exec container d2: exec: the process died before its exec "
                                     f"(killed by signal {SIGSYS} (SIGSYS)): the spec's seccomp filter "
                                     "kills a system call that the set-up or the exec needs"), err.value
        await _left_no_process_entry(calls, "d2", "x1")
    finally:
        await calls.RemoveContainer(container_id="d2")
        await calls.client.close()
    await _left_nothing(agent)
