"""kagent.policy without a process: the input shape, JSON patch, the engine and its decisions."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from kagent import devtools, oci, policy
from kagent.errors import AgentError, InvalidArgument
from kagent.protocols import agent_pb2, oci_pb2
from kagent.ttrpc.codes import Code

# --- the input: upstream's serde JSON of the request -------------------------------------------


def test_create_container_input_has_upstreams_shape():
    spec = devtools.default_spec("/run/r", ["/bin/sh", "-c", "true"])
    spec["annotations"] = {"io.kubernetes.cri.image-name": "busybox"}
    spec["linux"]["resources"] = {"memory": {"limit": 1 << 40}}
    req = agent_pb2.CreateContainerRequest(
        container_id="c1", OCI=oci.spec_from_dict(spec),
        devices=[agent_pb2.Device(id="d", type="blk")],
        storages=[agent_pb2.Storage(driver="local", fs_group=agent_pb2.FSGroup(
            group_id=5, group_change_policy=1))])
    doc = policy.request_input(req)
    assert doc["container_id"] == "c1" and doc["exec_id"] == "" and doc["sandbox_pidns"] is False
    assert doc["string_user"] is None  # an unset message is null
    oci_doc = doc["OCI"]
    assert oci_doc["Version"] == "1.0.2" and oci_doc["Hooks"] is None and oci_doc["Windows"] is None
    assert oci_doc["Process"]["Args"] == ["/bin/sh", "-c", "true"]
    assert oci_doc["Process"]["User"] == {"UID": 0, "GID": 0, "AdditionalGids": [], "Username": ""}
    assert oci_doc["Root"] == {"Path": "/run/r", "Readonly": False}
    assert oci_doc["Annotations"] == {"io.kubernetes.cri.image-name": "busybox"}
    assert oci_doc["Mounts"][0] == {"destination": "/proc", "source": "proc", "type_": "proc", "options": []}
    assert oci_doc["Linux"]["Resources"]["Memory"]["Limit"] == 1 << 40  # a number, not a string
    assert doc["devices"][0]["type_"] == "blk"  # Rust keywords get a trailing "_"
    assert doc["storages"][0]["fs_group"] == {"group_id": 5, "group_change_policy": 1}  # enum: its number


def test_bytes_oneofs_and_optionals():
    assert policy.request_input(agent_pb2.WriteStreamRequest(container_id="c", data=b"\x00hi")) == {
        "container_id": "c", "exec_id": "", "data": [0, 104, 105]}
    syscall = policy.request_input(oci_pb2.LinuxSyscall(Names=["read"], Action="SCMP_ACT_ERRNO", errnoret=1))
    assert syscall == {"Names": ["read"], "Action": "SCMP_ACT_ERRNO", "ErrnoRet": {"Errnoret": 1}, "Args": []}
    assert policy.request_input(oci_pb2.LinuxSyscall())["ErrnoRet"] is None
    memcg = policy.request_input(agent_pb2.MemAgentMemcgConfig(swap=True))
    assert memcg["swap"] is True and memcg["disabled"] is None  # proto3 optional: value or null


def test_copy_file_input_leaves_the_data_out():
    regular = agent_pb2.CopyFileRequest(path="/a", file_mode=stat.S_IFREG | 0o644, file_size=3, data=b"abc")
    assert policy.request_input(regular) == {
        "path": "/a", "file_type": "Regular", "symlink_target": None, "file_size": 3,
        "file_mode": stat.S_IFREG | 0o644, "dir_mode": 0, "uid": 0, "gid": 0, "offset": 0}
    link = agent_pb2.CopyFileRequest(path="/l", file_mode=stat.S_IFLNK | 0o777, data=b"..data/x")
    assert policy.request_input(link)["file_type"] == "Symlink"
    assert policy.request_input(link)["symlink_target"] == "..data/x"
    with pytest.raises(InvalidArgument):
        policy.request_input(agent_pb2.CopyFileRequest(file_mode=stat.S_IFLNK, data=b"\xff"))


# --- JSON patch (RFC 6902) ------------------------------------------------------------------

PATCHES = [
    ({"a": 1}, [{"op": "add", "path": "/b", "value": [1]}], {"a": 1, "b": [1]}),
    ({"a": [1, 3]}, [{"op": "add", "path": "/a/1", "value": 2}], {"a": [1, 2, 3]}),
    ({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}], {"a": [1, 2]}),
    ({"a": 1, "b": 2}, [{"op": "remove", "path": "/b"}], {"a": 1}),
    ({"a": 1}, [{"op": "replace", "path": "/a", "value": {"x": 1}}], {"a": {"x": 1}}),
    ({"a": {"x": 1}}, [{"op": "move", "from": "/a/x", "path": "/y"}], {"a": {}, "y": 1}),
    ({"a": [1]}, [{"op": "copy", "from": "/a", "path": "/b"}], {"a": [1], "b": [1]}),
    ({"a/b": 1, "m~n": 2}, [{"op": "test", "path": "/a~1b", "value": 1},
                            {"op": "remove", "path": "/m~0n"}], {"a/b": 1}),
    ({}, [{"op": "add", "path": "", "value": {"pstate": {}}}], {"pstate": {}}),
]

BAD_PATCHES = [
    [{"op": "remove", "path": "/missing"}],
    [{"op": "add", "path": "/a/b/c", "value": 1}],
    [{"op": "add", "path": "/l/5", "value": 1}],
    [{"op": "add", "path": "/l/01", "value": 1}],
    [{"op": "test", "path": "/t", "value": 1}],  # true is not 1
    [{"op": "replace", "path": "/missing", "value": 1}],
    [{"op": "move", "from": "/l", "path": "/l/0"}],
    [{"op": "add", "path": "no-slash", "value": 1}],
    [{"op": "add", "path": "/x"}],
    [{"op": "frobnicate", "path": "/x"}],
    {"op": "add"},
]


@pytest.mark.parametrize(("doc", "ops", "expected"), PATCHES)
def test_json_patch(doc, ops, expected):
    before = repr(doc)
    assert policy.apply_patch(doc, ops) == expected
    assert repr(doc) == before  # the original is untouched


@pytest.mark.parametrize("ops", BAD_PATCHES)
def test_json_patch_errors(ops):
    with pytest.raises(policy.PatchError):
        policy.apply_patch({"l": [1], "t": True}, ops)


# --- the engine ---------------------------------------------------------------------------

HEADER = "package agent_policy\n\nimport rego.v1\n\n"


def test_prints_are_captured_and_never_reach_stdout(capfd):
    engine = policy.Engine(HEADER + 'ExecProcessRequest if {\n  print("no exec for", input.container_id)\n'
                           '  print("second line")\n  false\n}\nStartContainerRequest := true\n')
    assert engine.evaluate("ExecProcessRequest", {"container_id": "c1"}) == (None, "no exec for c1 second line")
    assert engine.evaluate("StartContainerRequest", {}) == (True, "")
    out, _ = capfd.readouterr()
    assert out == ""


def test_undefined_and_unrepresentable_input():
    engine = policy.Engine(HEADER + "ExecProcessRequest := input.s != \"\"\n")
    assert engine.evaluate("StartContainerRequest", {}) == (None, "")  # no such rule: undefined
    assert engine.evaluate("ExecProcessRequest", {"s": "x"}) == (True, "")
    with pytest.raises(AgentError, match="NUL"):  # a C string would cut it short: refused
        engine.evaluate("ExecProcessRequest", {"s": "a\0b"})


def test_evaluation_error_is_internal():
    engine = policy.Engine(HEADER + "ExecProcessRequest := true if input.a\nExecProcessRequest := false if input.a\n")
    with pytest.raises(AgentError) as err:
        engine.evaluate("ExecProcessRequest", {"a": True})
    assert err.value.code == Code.INTERNAL
    assert "complete rules must not produce multiple outputs" in err.value.message


def test_compile_errors_say_where(capfd):
    with pytest.raises(policy.PolicyLoadError, match=r"agent_policy:3:"):
        policy.Engine("package agent_policy\n\nExecProcessRequest if {\n")
    assert capfd.readouterr().out == ""


def test_allow_failures_flag_and_data_state():
    assert policy.Engine(HEADER + "AllowRequestsFailingPolicy := true\n").allow_failures is True
    assert policy.Engine(HEADER + 'AllowRequestsFailingPolicy := "yes"\n').allow_failures is False
    engine = policy.Engine(HEADER + "StatsContainerRequest := data.pstate\n")
    engine.apply([{"op": "add", "path": "/pstate/n", "value": 1}])
    assert engine.evaluate("StatsContainerRequest", {}) == ({"n": 1}, "")
    with pytest.raises(policy.PatchError):
        engine.apply([{"op": "replace", "path": "", "value": [1]}])
    assert engine.data == {"pstate": {"n": 1}}  # a failed patch changes nothing


def test_policy_path_and_reading(tmp_path):
    default = tmp_path / "default-policy.rego"
    assert policy.policy_path(None, str(default)) is None
    default.write_text(HEADER)
    assert policy.policy_path(None, str(default)) == str(default)
    assert policy.policy_path("/etc/mine.rego", str(default)) == "/etc/mine.rego"
    (tmp_path / "bad.rego").write_bytes(b"\xff\xfe")
    with pytest.raises(policy.PolicyLoadError, match="not UTF-8"):
        policy.read_policy(str(tmp_path / "bad.rego"))
    with pytest.raises(policy.PolicyLoadError, match="cannot read"):
        policy.read_policy(str(tmp_path / "absent.rego"))


# --- decisions ------------------------------------------------------------------------------


def req(cid: str = "c1") -> agent_pb2.CreateContainerRequest:
    return agent_pb2.CreateContainerRequest(container_id=cid)


async def test_decision_results():
    ap = policy.AgentPolicy(policy.Engine(HEADER + (
        'CreateContainerRequest := {"allowed": input.container_id != "no"}\n'
        'StartContainerRequest := "yes"\n'
        'RemoveContainerRequest := {"allowed": true, "ops": [{"op": "remove", "path": "/nothing"}]}\n')))
    assert (await ap.check(req("c1"))).allowed is True
    denied = await ap.check(req("no"))
    assert denied.allowed is False and denied.denial().message == "CreateContainerRequest is blocked by policy: "
    undefined = await ap.check(agent_pb2.ExecProcessRequest())
    assert undefined.denial().message == (
        "ExecProcessRequest is blocked by policy: (rule data.agent_policy.ExecProcessRequest is undefined)")
    with pytest.raises(AgentError, match="unexpected policy result"):
        await ap.check(agent_pb2.StartContainerRequest())
    with pytest.raises(AgentError, match="ops cannot be applied"):
        await ap.check(agent_pb2.RemoveContainerRequest())


async def test_state_is_kept_in_order_across_concurrent_decisions():
    ap = policy.AgentPolicy(policy.Engine(HEADER + (
        'CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/pstate/n", '
        '"value": object.get(data.pstate, "n", 0) + 1}]}\n'
        "StatsContainerRequest := data.pstate.n\n")))
    decisions = await asyncio.gather(*(ap.check(req(f"c{i}")) for i in range(10)))
    assert all(d.allowed for d in decisions)
    assert ap.engine.data == {"pstate": {"n": 10}}  # no update was lost


async def test_allow_failures_turns_denials_into_allows():
    ap = policy.AgentPolicy(policy.Engine(HEADER + "AllowRequestsFailingPolicy := true\n"
                                          "CreateContainerRequest := false\n"))
    decision = await ap.check(req())
    assert decision.allowed is True and decision.reason == "denied"
    assert (await ap.check(agent_pb2.ExecProcessRequest())).allowed is True  # undefined too


async def test_load_states(tmp_path):
    none = policy.AgentPolicy.load(None, str(tmp_path / "absent.rego"))
    assert not none.enforcing and (await none.check(req())).allowed
    path = tmp_path / "p.rego"
    path.write_text("package agent_policy\nthis is not rego\n")
    failed = policy.AgentPolicy.load(str(path))
    assert failed.enforcing and failed.engine is None and failed.failure.startswith(str(path))
    assert not (await failed.check(req())).allowed
    await failed.set_policy(agent_pb2.SetPolicyRequest(policy=HEADER + "CreateContainerRequest := true\n"))
    assert failed.failure is None and (await failed.check(req())).allowed


# --- the interceptor on its own (a real pipe stands for a container's stdout) ---------------------


class _Ctx:
    service = policy.AGENT_SERVICE
    method = "ReadStdout"
    request_name = "ReadStreamRequest"


class _PipeReply:
    """What kagent.stdio returns while the output is still in the pipe (a ttRPC RawReply)."""

    def __init__(self, fd: int, ready: int, size: int) -> None:
        self.stream = type("Stream", (), {"fd": fd})()
        self.ready, self.size, self.discarded = ready, size, False

    def discard(self) -> None:
        self.discarded = True


async def _ready(value):
    return value


@pytest.mark.parametrize("rule", ["ReadStreamRequest := false",
                                  "ReadStreamRequest := true if input.len\nReadStreamRequest := false if input.len"])
async def test_withheld_reads_still_drain_the_pipe(rule):
    ap = policy.AgentPolicy(policy.Engine(HEADER + rule + "\n"))  # denied, or failing at evaluation
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        os.write(w, b"secret" * 100)
        reply = _PipeReply(r, 600, 500)
        out = await ap.interceptor(_Ctx(), agent_pb2.ReadStreamRequest(len=500), lambda: _ready(reply))
        assert out == agent_pb2.ReadStreamResponse() and reply.discarded
        assert os.read(r, 1000) == (b"secret" * 100)[500:]  # what the reply announced was read out
        out = await ap.interceptor(_Ctx(), agent_pb2.ReadStreamRequest(len=5),
                                   lambda: _ready(agent_pb2.ReadStreamResponse(data=b"data")))
        assert out.data == b""
    finally:
        os.close(r)
        os.close(w)
