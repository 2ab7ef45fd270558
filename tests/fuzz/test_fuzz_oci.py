"""Fuzz target: OCI specs through CreateContainer on a running (sandboxed) agent.

A valid busybox spec gets 1..4 hostile edits: invalid paths (relative, ``..``,
NUL, very long, missing sources), huge and negative values (memory, CPU, pids,
rlimits, ids, OOM score, console size), unknown or repeated namespaces,
capabilities, seccomp actions, sysctls, cgroup paths that climb out.  Properties:
CreateContainer answers with a status and, when it refuses, a message (never
INTERNAL for bad input: recorded as a finding); a container that was created
starts, exits and is removed; either way nothing is left: no bundle, no cgroup,
no worker, no fd, no mount.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re

import pytest
import reliability_harness as harness
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root

REFUSALS = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND, Code.UNIMPLEMENTED,
            Code.PERMISSION_DENIED, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE}

BAD_PATHS = ["data", "", "../../../../escape", "/proc/../../escape", "/a\x00b", "/" + "a" * 5000,
             "/" + "/".join(["d"] * 600), "/proc/self/root/escape", "/proc/1/cwd/x", "/sys/../etc/x",
             "/dev/../../x", "//", "/.", "/..", "/proc/sys/kernel/core_pattern"]
HUGE = [2**63 - 1, 2**63, 2**64 - 1, -1, -2, -2**63, 0, 1, 2**31, 2**32]


def _set(spec: dict, path: list, value) -> None:
    d = spec
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


@st.composite
def hostile_edit(draw, workdir: str):
    """One edit: (description, function spec -> None)."""
    kind = draw(st.sampled_from([
        "mount_dest", "mount_source", "mount_type", "mount_opts", "root", "cwd", "masked", "readonly",
        "memory", "cpu", "pids", "rlimit", "user", "oom", "console", "hugepages", "blkio", "devices",
        "namespace", "caps", "seccomp", "sysctl", "hostname", "cgroups_path", "args", "env", "idmap",
        "propagation", "annotations",
    ]))
    bad = draw(st.sampled_from(BAD_PATHS) | st.text(max_size=12))
    big = draw(st.sampled_from(HUGE) | st.integers(-2**64, 2**65))
    word = draw(st.sampled_from(["bogus", "", "CAP_SYS_ADMIN", "CAP_NOPE", "SCMP_ACT_NOPE", "pid", "user",
                                 "time", "cgroup", "network", "mount", "uts", "ipc", "x" * 300]))

    def apply(spec: dict) -> None:
        linux, process = spec["linux"], spec["process"]
        mounts = spec["mounts"]
        if kind == "mount_dest":
            mounts.append({"destination": bad, "type": "tmpfs", "source": "tmpfs"})
        elif kind == "mount_source":
            src = bad if not bad.startswith("/") else os.path.join(workdir, "binds", bad.lstrip("/"))
            mounts.append({"destination": "/mnt", "type": "bind", "source": src, "options": ["rbind", word]})
        elif kind == "mount_type":
            mounts.append({"destination": "/mnt", "type": "fzfs-" + word[:8], "source": "none"})
        elif kind == "mount_opts":
            mounts.append({"destination": "/mnt", "type": "tmpfs", "source": "tmpfs",
                           "options": [word, f"size={big}", f"mode={big}", "nr_inodes=-1"]})
        elif kind == "root":
            spec["root"]["path"] = bad if not bad.startswith("/") else os.path.join(workdir, "nope", bad)
        elif kind == "cwd":
            process["cwd"] = bad
        elif kind == "masked":
            linux["maskedPaths"] = [bad, "/proc/kcore"]
        elif kind == "readonly":
            linux["readonlyPaths"] = [bad]
        elif kind == "memory":
            _set(linux, ["resources", "memory", draw(st.sampled_from(["limit", "reservation", "swap",
                                                                       "kernel", "swappiness"]))], big)
        elif kind == "cpu":
            _set(linux, ["resources", "cpu", draw(st.sampled_from(["shares", "quota", "period",
                                                                    "realtimeRuntime", "cpus", "mems"]))],
                 big if draw(st.booleans()) else f"{big}-{word}")
        elif kind == "pids":
            _set(linux, ["resources", "pids", "limit"], big)
        elif kind == "rlimit":
            process["rlimits"] = [{"type": draw(st.sampled_from(["RLIMIT_NOFILE", "RLIMIT_NPROC", word])),
                                   "hard": abs(big) % 2**64, "soft": (abs(big) + 1) % 2**64}]
        elif kind == "user":
            process["user"] = {"uid": abs(big) % 2**32, "gid": abs(big) % 2**32,
                               "additionalGids": list(range(draw(st.integers(0, 70000)) % 70000))[:70000]}
        elif kind == "oom":
            process["oomScoreAdj"] = max(-2**63, min(big, 2**63 - 1))
        elif kind == "console":
            process["terminal"] = True
            process["consoleSize"] = {"height": abs(big) % 2**32, "width": abs(big) % 2**32}
        elif kind == "hugepages":
            _set(linux, ["resources", "hugepageLimits"], [{"pageSize": word, "limit": abs(big) % 2**64}])
        elif kind == "blkio":
            _set(linux, ["resources", "blockIO"], {"weight": abs(big) % 2**16,
                                                   "throttleReadBpsDevice": [{"major": big % 2**63, "minor": -1,
                                                                              "rate": abs(big) % 2**64}]})
        elif kind == "devices":
            linux["devices"] = [{"path": bad, "type": draw(st.sampled_from(["c", "b", "u", "p", word])),
                                 "major": big % 2**63, "minor": big % 2**63, "fileMode": abs(big) % 2**32}]
        elif kind == "namespace":
            ns = {"type": word}
            if draw(st.booleans()):
                ns["path"] = os.path.join(workdir, "binds", "file")  # a file that is not a namespace
            linux["namespaces"] = linux["namespaces"] + [ns]
        elif kind == "caps":
            process["capabilities"] = {s: [word, "CAP_KILL"] for s in ("bounding", "effective", "permitted",
                                                                       "ambient", "inheritable")}
        elif kind == "seccomp":
            linux["seccomp"] = {"defaultAction": word, "architectures": [word],
                                "syscalls": [{"names": [word, "read"], "action": "SCMP_ACT_ERRNO",
                                              "errnoRet": abs(big) % 2**32,
                                              "args": [{"index": abs(big) % 2**32, "value": abs(big) % 2**64,
                                                        "op": word}]}]}
        elif kind == "sysctl":
            linux["sysctl"] = {draw(st.sampled_from(["vm.swappiness", "kernel.shmmax", "net.ipv4.ip_forward",
                                                     "fs.mqueue.msg_max", "kernel.hostname", "../x", word])):
                               str(big)}
        elif kind == "hostname":
            spec["hostname"] = word * 3
            linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "uts"]
        elif kind == "cgroups_path":
            linux["cgroupsPath"] = draw(st.sampled_from(["../../../escape", "/../../x", "a:b:c", "::",
                                                         "/kubepods/../../..", "x.slice:p:n", bad]))
        elif kind == "args":
            process["args"] = draw(st.sampled_from([[], [""], ["/nonexistent"], ["/bin"], [bad]]))
        elif kind == "env":
            process["env"] = [bad, "=x", "A", "B=" + "v" * 100000]
        elif kind == "idmap":
            linux["uidMappings"] = [{"containerID": 0, "hostID": abs(big) % 2**32, "size": abs(big) % 2**32}]
            if draw(st.booleans()):
                linux["namespaces"] = linux["namespaces"] + [{"type": "user"}]
        elif kind == "propagation":
            linux["rootfsPropagation"] = word
        elif kind == "annotations":
            spec["annotations"] = {word: bad, "io.kubernetes.cri.container-type": word}

    return f"{kind}({bad!r}, {big}, {word!r})", apply


class OciFuzzer:
    def __init__(self) -> None:
        self.agent = harness.AgentUnderTest(sandboxed=True, log_level="info")
        self.rootfs = harness.make_rootfs(self.agent.workdir)
        os.makedirs(os.path.join(self.agent.workdir, "binds"))
        with open(os.path.join(self.agent.workdir, "binds", "file"), "w") as f:
            f.write("x\n")
        self.n = 0

    def run(self, coro, timeout: float = 120):
        return uvloop.run(asyncio.wait_for(coro, timeout))

    async def attempt(self, spec: dict, what: str) -> None:
        self.n += 1
        cid = f"oci{self.n}"
        async with await self.agent.connect() as c:
            try:
                await c.call("grpc.AgentService", "CreateContainer", _create(cid, spec),
                             oci_empty(), timeout=30)
            except RpcError as err:
                harness.record("oci.refused")
                if err.code == Code.INTERNAL:
                    # one finding per kind of message (ids, paths and numbers vary)
                    text = re.sub(r"oci\d+", "<cid>", err.message)
                    text = re.sub(r"/tmp/kag-[^/ ]+", "<workdir>", text)
                    harness.finding(f"CreateContainer of a bad spec: INTERNAL: {re.sub(r'-?[0-9]+', 'N', text)[:140]}")
                else:
                    assert err.code in REFUSALS, (what, err)
                assert err.message.strip(), (what, err)
            else:
                harness.record("oci.created")
                await _run_and_remove(c, cid)
        assert self.agent.alive(), self.agent.log_tail()
        assert not os.path.exists(os.path.join(self.agent.run_dir, cid)), f"bundle left: {what}"
        assert not [g for g in self.agent.cgroups() if f"/{cid} " in g or g.endswith(f"/{cid}")], what


def oci_empty():
    from google.protobuf import empty_pb2

    return empty_pb2.Empty


def _create(cid: str, spec: dict):
    from kagent.protocols import agent_pb2

    return agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec))


async def _run_and_remove(c, cid: str) -> None:
    from kagent.protocols import agent_pb2

    try:
        await c.call("grpc.AgentService", "StartContainer", agent_pb2.StartContainerRequest(container_id=cid),
                     oci_empty(), timeout=15)
        await c.call("grpc.AgentService", "WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid,
                                                                                       exec_id=cid),
                     agent_pb2.WaitProcessResponse, timeout=5)
    except RpcError:
        pass  # a process that cannot start, or one still running: removal ends it
    await c.call("grpc.AgentService", "RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid,
                                                                                           timeout=10),
                 oci_empty(), timeout=30)


@pytest.fixture(scope="module")
def ofz():
    harness.busybox_or_skip()
    f = OciFuzzer()
    try:
        f.run(f.agent.wait_ready())
        f.run(f.attempt(base_spec(f.rootfs), "warm-up"))  # thread pools, first worker
        f.run(asyncio.sleep(0.3))
        f.baseline = f.agent.snapshot()
        yield f
    finally:
        rc = f.agent.stop()
        left = f.agent.cleanup()
        assert rc == 0 and left == [], (rc, left)


def base_spec(rootfs: str) -> dict:
    s = devtools.default_spec(rootfs, ["/bin/sh", "-c", "exit 0"])
    s["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 64}}
    return s


def test_hostile_specs_get_clear_answers_and_leave_nothing(ofz):
    @harness.fuzz_settings(30, long=2000)
    @given(edits=st.lists(hostile_edit(ofz.agent.workdir), min_size=1, max_size=4))
    def run(edits):
        spec = copy.deepcopy(base_spec(ofz.rootfs))
        for _, apply in edits:
            apply(spec)
        try:
            oci.spec_from_dict(spec)
        except (ValueError, TypeError, OverflowError):
            harness.record("oci.unencodable")  # the host could not have sent it either
            return
        ofz.run(ofz.attempt(spec, " + ".join(what for what, _ in edits)))

    run()
    problems = ofz.run(harness.settle(ofz.agent, ofz.baseline, timeout=15, rss_slack=64 << 20))
    # Parents made for a container (systemd slices, /kubepods/<pod>) stay, empty, until the
    # agent stops (it removes empty ones then), as upstream: others of the pod may use them.
    # Bounded by the distinct parents named; none may hold a process.
    problems = [p for p in problems if not p.startswith("cgroups ")]
    busy = []
    for top in ofz.agent.cgroup_dirs():
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files and open(os.path.join(dirpath, "cgroup.procs")).read().strip():
                busy.append(dirpath)
    assert busy == [], f"cgroups with processes left: {busy}"
    after = ofz.agent.snapshot()
    harness.figure("oci fuzz agent", fds=f"{len(ofz.baseline.fds)}->{len(after.fds)}",
                   rss_mib=f"{ofz.baseline.rss >> 20}->{after.rss >> 20}",
                   threads=f"{ofz.baseline.threads}->{after.threads}",
                   empty_parent_cgroups_left=len(after.cgroups) - len(ofz.baseline.cgroups))
    assert problems == [], problems
    assert os.listdir(ofz.agent.run_dir) == []
