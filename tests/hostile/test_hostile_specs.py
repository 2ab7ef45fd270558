"""Regression tests for what the fuzzers found in spec and request handling (see
tests/fuzz/FINDINGS.md).  A strict xfail names the file and the fix: when the owner
fixes it the test passes, the xfail turns into a failure, and the marker comes off.
Runs on a sandboxed agent (some specs here lack namespaces on purpose)."""

from __future__ import annotations

import pytest
import reliability_harness as harness

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agent():
    harness.busybox_or_skip()
    a = harness.AgentUnderTest(sandboxed=True, log_level="info")
    a.rootfs = harness.make_rootfs(a.workdir)
    try:
        harness_run(a.wait_ready())
        yield a
    finally:
        rc = a.stop()
        left = a.cleanup()
        assert rc == 0 and left == [], (rc, left)


def harness_run(coro):
    import uvloop

    return uvloop.run(coro)


async def create_error(agent, spec: dict) -> RpcError | None:
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("s1", spec)
    except RpcError as err:
        return err
    else:
        await calls.RemoveContainer(container_id="s1")
        return None
    finally:
        await calls.client.close()


async def test_masked_paths_without_a_mount_namespace_are_refused(agent):
    """Upstream refuses maskedPaths/readonlyPaths without a mount namespace (they could not be
    applied); kagent refuses any container without a mount namespace of its own."""
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "mount"]
    spec["mounts"] = []
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT and "mount namespace" in err.message, err


@pytest.mark.xfail(strict=True, reason=(
    "finding: a consoleSize over 65535 fails deep in the worker with 'set-up: error: ushort format "
    "requires 0 <= number <= 65535' (a struct.error, INTERNAL).  Fix: validate consoleSize "
    "(kagent/runtime) and raise InvalidArgument naming it"))
async def test_console_size_out_of_range_is_a_clear_error(agent):
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"], terminal=True)
    spec["process"]["consoleSize"] = {"height": 70000, "width": 80}
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT and "console" in err.message.lower(), err


def _relative_destination(spec):
    spec["mounts"].append({"destination": "data", "type": "tmpfs", "source": "tmpfs"})


def _unknown_propagation(spec):
    spec["linux"]["rootfsPropagation"] = "sideways"


def _unsupported_namespace(spec):
    spec["linux"]["namespaces"].append({"type": "time"})


@pytest.mark.xfail(strict=True, reason=(
    "finding: invalid specs the worker detects after its 'spec' step come back INTERNAL, not "
    "INVALID_ARGUMENT: kagent/container.py worker_error maps only step == 'spec' to "
    "InvalidArgument.  (Upstream answers INTERNAL for all of these, so this is a kagent design "
    "choice to settle: raise these validations under the 'spec' step, or validate before forking)"))
@pytest.mark.parametrize("edit", [_relative_destination, _unknown_propagation, _unsupported_namespace],
                         ids=["relative mount destination", "unknown rootfs propagation", "time namespace"])
async def test_invalid_specs_are_invalid_argument(agent, edit):
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
    edit(spec)
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT, err


@pytest.mark.xfail(strict=True, reason=(
    "finding: ExecProcess (and CreateContainer) with a user name missing from the container's "
    "/etc/passwd answers INTERNAL ('user: no user ... in the container's /etc/passwd').  Fix: "
    "InvalidArgument (or NOT_FOUND) for unknown users and groups"))
async def test_exec_as_an_unknown_user_is_not_internal(agent):
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("u1", devtools.default_spec(agent.rootfs, ["/bin/sleep", "100"]))
        await calls.StartContainer(container_id="u1")
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="u1", exec_id="e1", string_user={"uid": "nobody-here"},
                                    process=oci.process_from_dict({"args": ["/bin/true"], "cwd": "/"}))
        assert err.value.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), err.value
    finally:
        await calls.RemoveContainer(container_id="u1")
        await calls.client.close()


@pytest.mark.xfail(strict=True, reason=(
    "finding: SetIPTables with rules iptables-restore rejects answers INTERNAL "
    "(kagent/iptables.py).  The input is the host's: INVALID_ARGUMENT, with iptables-restore's "
    "message, would tell it what to fix"))
async def test_set_iptables_with_bad_rules_is_invalid_argument(agent):
    calls = harness.Calls(await agent.connect())
    try:
        with pytest.raises(RpcError) as err:
            await calls.SetIPTables(is_ipv6=False, data=b"*filter\n-A NOPE -j WHAT\nCOMMIT\n")
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
    finally:
        await calls.client.close()


@pytest.mark.xfail(strict=True, reason=(
    "finding (kagent/policy.py Engine): SetPolicy accepts a document with no package declaration "
    "('x', '0' compile), which upstream's engine (regorus) refuses.  The policy then has no "
    "rules: every AgentService request is refused, SetPolicy included, until the agent "
    "restarts — the RPC fuzzer locked its agent with such a byte string.  Fix: require "
    "'package agent_policy' (InvalidArgument otherwise)"))
async def test_set_policy_without_a_package_is_refused():
    harness.busybox_or_skip()
    agent = harness.AgentUnderTest(sandboxed=True, log_level="info")
    try:
        await agent.wait_ready()
        calls = harness.Calls(await agent.connect())
        try:
            with pytest.raises(RpcError) as err:
                await calls.SetPolicy(policy="x")
            assert err.value.code == Code.INVALID_ARGUMENT, err.value
        finally:
            await calls.client.close()
    finally:
        rc = agent.stop()
        agent.cleanup()
        assert rc == 0


@pytest.mark.xfail(strict=True, reason=(
    "finding (kagent/guest.py): a path with a NUL byte makes os.open/os.statvfs raise ValueError, "
    "which no handler expects: GetVolumeStats and AddSwapPath answer 'INTERNAL: ValueError: "
    "embedded null byte'.  Fix: refuse NUL in host-given paths (InvalidArgument), as CopyFile does"))
@pytest.mark.parametrize("rpc,field", [("GetVolumeStats", "volume_guest_path"), ("AddSwapPath", "path")])
async def test_paths_with_a_nul_byte_are_invalid_argument(agent, rpc, field):
    calls = harness.Calls(await agent.connect())
    try:
        with pytest.raises(RpcError) as err:
            await getattr(calls, rpc)(**{field: "/run/a\x00b"})
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
    finally:
        await calls.client.close()
