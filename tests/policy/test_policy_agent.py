"""The agent policy through ttRPC, against a running kagent (policies written for these tests).

"Allowed" shows as the handler's own answer (a request about a container that does not
exist gets NOT_FOUND); "denied" is PERMISSION_DENIED before any handler runs.
"""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest
from policy_harness import connect

import kagent.agent
from kagent import devtools, oci, policy
from kagent.protocols import health_pb2
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError


def rego(*rules: str, allow_rest: bool = True) -> str:
    """A policy: ``rules``, and every other request allowed (by default) or left undefined."""
    text = "\n".join(rules)
    defaults = [f"default {r} := true" for r in policy.RULES
                if allow_rest and r != policy.ALLOW_FAILURES_RULE and f"{r} " not in text + " "
                and f"{r}(" not in text and f"{r}:" not in text]
    return "package agent_policy\n\nimport rego.v1\n\n" + "\n".join(defaults) + "\n\n" + text + "\n"


async def status_of(call) -> tuple[int, str]:
    try:
        await call
    except RpcError as err:
        return err.code, err.message
    return Code.OK, ""


async def exec_status(calls, cid: str = "missing") -> tuple[int, str]:
    return await status_of(calls.ExecProcess(container_id=cid, exec_id="e1",
                                             process=oci.process_from_dict({"args": ["/bin/sh"], "cwd": "/"})))


DENY_EXEC = rego(
    "default ExecProcessRequest := false",
    'ExecProcessRequest if {\n    print("exec in", input.container_id, "is not allowed:", input.process.Args)\n'
    "    false\n}",
)


async def test_without_a_policy_everything_is_allowed_and_set_policy_installs_one(start_agent):
    if os.path.exists(policy.DEFAULT_POLICY_FILE):
        pytest.skip(f"{policy.DEFAULT_POLICY_FILE} exists on this machine")
    agent = start_agent(None)
    calls = await connect(agent)
    assert (await exec_status(calls))[0] == Code.NOT_FOUND
    await calls.SetPolicy(policy=DENY_EXEC)
    code, message = await exec_status(calls)
    assert code == Code.PERMISSION_DENIED
    assert message == 'ExecProcessRequest is blocked by policy: exec in missing is not allowed: ["/bin/sh"]'


async def test_deny_all_exec(start_agent):
    agent = start_agent(DENY_EXEC)
    calls = await connect(agent)
    code, message = await exec_status(calls, "c1")
    assert code == Code.PERMISSION_DENIED
    assert message == 'ExecProcessRequest is blocked by policy: exec in c1 is not allowed: ["/bin/sh"]'
    # everything else reaches its handler; grpc.Health is never policed
    assert (await status_of(calls.StartContainer(container_id="c1")))[0] == Code.NOT_FOUND
    check = await calls.client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                    health_pb2.HealthCheckResponse)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    log = agent.log()
    assert '"msg":"request blocked by policy"' in log
    # at debug level every decision is logged with its input and result
    assert ('"msg":"policy decision"' in log and '"rule":"ExecProcessRequest","allowed":false,"result":false'
            in log and '"input":{"container_id":"c1","exec_id":"e1"' in log)


IMAGES_AND_ARGS = rego(
    "default CreateContainerRequest := false",
    'allowed := {"registry.example/busybox:1": [["/bin/sh", "-c", "echo hello"], ["/bin/true"]]}',
    "CreateContainerRequest if {\n"
    '    image := input.OCI.Annotations["io.kubernetes.cri.image-name"]\n'
    "    input.OCI.Process.Args in allowed[image]\n}",
    'CreateContainerRequest if {\n    not input.OCI.Annotations["io.kubernetes.cri.image-name"] in object.keys(allowed)\n'
    '    print("image", input.OCI.Annotations["io.kubernetes.cri.image-name"], "is not allowed")\n'
    "    false\n}",
)


def spec(rootfs: str, args: list[str], image: str = "registry.example/busybox:1") -> dict:
    s = devtools.default_spec(rootfs, args)
    s["annotations"] = {"io.kubernetes.cri.image-name": image}
    return s


async def read_all(calls, cid: str) -> bytes:
    chunks = []
    while chunk := (await calls.ReadStdout(container_id=cid, exec_id=cid, len=65536, timeout=None)).data:
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.root
async def test_only_given_images_and_args(start_agent, rootfs):
    calls = await connect(start_agent(IMAGES_AND_ARGS))
    await calls.create("ok", spec(rootfs, ["/bin/sh", "-c", "echo hello"]))
    await calls.StartContainer(container_id="ok")
    assert await read_all(calls, "ok") == b"hello\n"
    assert (await calls.WaitProcess(container_id="ok", exec_id="ok")).status == 0
    await calls.RemoveContainer(container_id="ok")

    code, message = await status_of(calls.create("args", spec(rootfs, ["/bin/sh", "-c", "reboot"])))
    assert (code, message) == (Code.PERMISSION_DENIED, "CreateContainerRequest is blocked by policy: ")
    code, message = await status_of(calls.create("image", spec(rootfs, ["/bin/true"], "evil.example/x:1")))
    assert (code, message) == (Code.PERMISSION_DENIED,
                               "CreateContainerRequest is blocked by policy: image evil.example/x:1 is not allowed")
    code, _ = await status_of(calls.StartContainer(container_id="args"))
    assert code == Code.NOT_FOUND  # the denied containers were never created


@pytest.mark.root
async def test_reads_are_allowed_but_redacted(start_agent, rootfs):
    calls = await connect(start_agent(rego('default ReadStreamRequest := false')))
    # 1 MiB of output: far more than a pipe holds, so the container finishes only if the
    # withheld reads still drain its pipe.
    await calls.create("c1", devtools.default_spec(rootfs, ["/bin/sh", "-c",
                                                           "dd if=/dev/zero bs=4096 count=256; echo done >&2"]))
    await calls.StartContainer(container_id="c1")
    wait = asyncio.ensure_future(calls.WaitProcess(container_id="c1", exec_id="c1", timeout=None))

    async def reader(read) -> int:
        reads = 0
        while not wait.done():
            try:
                reply = await read(container_id="c1", exec_id="c1", len=65536, timeout=None)
            except RpcError as err:  # WaitProcess has just removed the process
                assert err.code == Code.NOT_FOUND
                break
            assert reply.data == b""
            reads += 1
        return reads

    reads = await asyncio.gather(reader(calls.ReadStdout), reader(calls.ReadStderr))
    assert reads[0] > 1  # the pipe was read again and again, never returned
    assert (await wait).status == 0
    await calls.RemoveContainer(container_id="c1")


ONE_CREATE_PER_ID = rego(
    "default CreateContainerRequest := false",
    "CreateContainerRequest := {\"allowed\": true, \"ops\": [{\"op\": \"add\", \"path\": concat(\"/\", "
    "[\"\", \"pstate\", input.container_id]), \"value\": \"created\"}]} if {\n"
    "    not data.pstate[input.container_id]\n}",
    "CreateContainerRequest if {\n    data.pstate[input.container_id]\n"
    '    print("container", input.container_id, "was created before")\n    false\n}',
)


async def test_stateful_policy_allows_one_create_per_id(start_agent):
    calls = await connect(start_agent(ONE_CREATE_PER_ID))
    bad_spec = {"ociVersion": "1.0.2", "root": {"path": "/nonexistent"}}  # no process: the handler refuses it

    code, message = await status_of(calls.create("c1", bad_spec))
    assert code == Code.INVALID_ARGUMENT, message  # allowed: the handler answered
    code, message = await status_of(calls.create("c1", bad_spec))
    assert (code, message) == (Code.PERMISSION_DENIED,
                               "CreateContainerRequest is blocked by policy: container c1 was created before")
    assert (await status_of(calls.create("c2", bad_spec)))[0] == Code.INVALID_ARGUMENT
    # decided one at a time: of many concurrent creates of one id, exactly one is allowed
    codes = [c for c, _ in await asyncio.gather(*(status_of(calls.create("c3", bad_spec)) for _ in range(8)))]
    assert sorted(codes) == [Code.INVALID_ARGUMENT] + [Code.PERMISSION_DENIED] * 7


async def test_allow_requests_failing_policy(start_agent):
    agent = start_agent(DENY_EXEC.replace("import rego.v1", "import rego.v1\n\nAllowRequestsFailingPolicy := true"))
    calls = await connect(agent)
    assert (await exec_status(calls))[0] == Code.NOT_FOUND  # denied, but let through
    assert "request failing the policy allowed (AllowRequestsFailingPolicy)" in agent.log()


SET_POLICY_THEN_LOCK = rego(
    "default SetPolicyRequest := false",
    'SetPolicyRequest if contains(input.policy, "# signed-by: ops")',
    "default ExecProcessRequest := false",
)


async def test_set_policy_allowed_then_denied(start_agent):
    agent = start_agent(SET_POLICY_THEN_LOCK)
    calls = await connect(agent)
    assert (await exec_status(calls))[0] == Code.PERMISSION_DENIED
    # not accepted by the current policy's SetPolicyRequest rule
    code, message = await status_of(calls.SetPolicy(policy=rego("default SetPolicyRequest := true")))
    assert (code, message) == (Code.PERMISSION_DENIED, "SetPolicyRequest is blocked by policy: ")
    assert (await exec_status(calls))[0] == Code.PERMISSION_DENIED  # the old policy stays
    # accepted: the new policy allows exec and refuses any further SetPolicy
    await calls.SetPolicy(policy="# signed-by: ops\n" + rego("default SetPolicyRequest := false"))
    assert (await exec_status(calls))[0] == Code.NOT_FOUND
    code, _ = await status_of(calls.SetPolicy(policy="# signed-by: ops\n" + DENY_EXEC))
    assert code == Code.PERMISSION_DENIED
    assert (await exec_status(calls))[0] == Code.NOT_FOUND
    assert '"msg":"agent policy replaced"' in agent.log()


MALFORMED = "package agent_policy\n\nExecProcessRequest if {\n    input.container_id ==\n"


async def test_malformed_policy_at_start_up_refuses_everything_until_set_policy(start_agent):
    agent = start_agent(MALFORMED)
    calls = await connect(agent)
    for call in (exec_status(calls), status_of(calls.StartContainer(container_id="c1")),
                 status_of(calls.GetGuestDetails())):
        code, message = await call
        assert code == Code.PERMISSION_DENIED
        assert "is blocked by policy: (the agent policy failed to load: " in message
    # a bad SetPolicy is refused and changes nothing
    code, message = await status_of(calls.SetPolicy(policy=MALFORMED))
    assert code == Code.INVALID_ARGUMENT and message.startswith("SetPolicy: the policy does not compile: ")
    assert (await exec_status(calls))[0] == Code.PERMISSION_DENIED
    await calls.SetPolicy(policy=rego())
    assert (await exec_status(calls))[0] == Code.NOT_FOUND
    assert "agent policy failed to load" in agent.log()


async def test_malformed_set_policy_keeps_the_old_policy(start_agent):
    calls = await connect(start_agent(DENY_EXEC))
    code, message = await status_of(calls.SetPolicy(policy=MALFORMED))
    assert code == Code.INVALID_ARGUMENT
    assert "agent_policy:" in message  # rego-cpp says where the error is
    assert (await exec_status(calls))[0] == Code.PERMISSION_DENIED


async def test_missing_policy_file_refuses_everything(start_agent, tmp_path):
    calls = await connect(start_agent(None, KATA_AGENT_POLICY_FILE=str(tmp_path / "absent.rego")))
    code, message = await exec_status(calls)
    assert code == Code.PERMISSION_DENIED and "cannot read" in message


async def test_policy_that_fails_at_evaluation(start_agent):
    calls = await connect(start_agent(rego(
        "ExecProcessRequest := true if input.container_id != \"\"",
        "ExecProcessRequest := false if input.exec_id != \"\"",
    )))
    code, message = await exec_status(calls)
    assert code == Code.INTERNAL
    assert message.startswith("ExecProcessRequest: internal error: policy evaluation failed: ")
    assert "eval_conflict_error" in message
    assert (await status_of(calls.StartContainer(container_id="c1")))[0] == Code.NOT_FOUND


async def test_guest_details_list_the_policy_feature(start_agent):
    if "policy" not in inspect.getsource(kagent.agent):
        pytest.skip("kagent.agent does not integrate the policy yet (GetGuestDetails cannot list it)")
    calls = await connect(start_agent(rego()))
    details = await calls.GetGuestDetails()
    assert policy.FEATURE in details.agent_details.extra_features
