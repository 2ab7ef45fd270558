"""Regression tests for what the fuzzers found in spec and request handling (see
tests/fuzz/FINDINGS.md): each bad input gets a clear error with the right code, and the
agent goes on.  Runs on a sandboxed agent (some specs here lack namespaces on purpose)."""

from __future__ import annotations

import os

import pytest
import reliability_harness as harness

from kagent import devtools, oci
from kagent.ttrpc.codes import Code
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def agent():
    with harness.busybox_agent(sandboxed=True) as a:
        harness.run(a.wait_ready())
        yield a


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


async def test_console_size_out_of_range_is_a_clear_error(agent):
    """Finding 7: a consoleSize over 65535 (a winsize field is a ushort) failed deep in the worker
    with a struct.error, INTERNAL."""
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"], terminal=True)
    spec["process"]["consoleSize"] = {"height": 70000, "width": 80}
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT, err
    assert "process.consoleSize.height" in err.message and "70000" in err.message, err


def _relative_destination(spec):
    spec["mounts"].append({"destination": "data", "type": "tmpfs", "source": "tmpfs"})


def _unknown_propagation(spec):
    spec["linux"]["rootfsPropagation"] = "sideways"


def _unsupported_namespace(spec):
    spec["linux"]["namespaces"].append({"type": "time"})


def _unknown_user(spec):
    spec["process"]["user"]["username"] = "nobody-here"


@pytest.mark.parametrize("edit,named", [
    (_relative_destination, "'data' must be an absolute path"),
    (_unknown_propagation, "'sideways'"),
    (_unsupported_namespace, "'time'"),
    (_unknown_user, "no user 'nobody-here'"),
], ids=["relative mount destination", "unknown rootfs propagation", "time namespace", "unknown user"])
async def test_invalid_specs_are_invalid_argument(agent, edit, named):
    """Finding 8: invalid specs found after the worker's first checks (in the container's
    set-up) came back INTERNAL."""
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
    edit(spec)
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT and named in err.message, err


@pytest.mark.parametrize("string_user,named", [
    ({"uid": "nobody-here"}, "no user 'nobody-here'"),
    ({"uid": "0", "gid": "no-such-group"}, "no group 'no-such-group'"),
    ({"uid": "99999999999"}, "string_user.uid"),  # an OverflowError in setresuid before
], ids=["unknown user", "unknown group", "huge numeric uid"])
async def test_exec_as_an_unknown_user_is_not_internal(agent, string_user, named):
    """Finding 8: ExecProcess as a user missing from the container's /etc/passwd answered
    INTERNAL.  INVALID_ARGUMENT (kagent/runtime/users.py says why not NOT_FOUND); the container
    goes on."""
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("u1", devtools.default_spec(agent.rootfs, ["/bin/sleep", "100"]))
        await calls.StartContainer(container_id="u1")
        with pytest.raises(RpcError) as err:
            await calls.ExecProcess(container_id="u1", exec_id="e1", string_user=string_user,
                                    process=oci.process_from_dict({"args": ["/bin/true"], "cwd": "/"}))
        assert err.value.code == Code.INVALID_ARGUMENT and named in err.value.message, err.value
        await calls.ExecProcess(container_id="u1", exec_id="e1",
                                process=oci.process_from_dict({"args": ["/bin/true"], "cwd": "/"}))
        assert (await calls.WaitProcess(container_id="u1", exec_id="e1")).status == 0
    finally:
        await calls.RemoveContainer(container_id="u1")
        await calls.client.close()


def _hugepage_size(spec):
    spec["linux"]["resources"] = {"hugepageLimits": [{"pageSize": "bogus", "limit": 2 << 20}]}


def _rlimit(**limit):
    def edit(spec):
        spec["process"]["rlimits"] = [{"type": "RLIMIT_CORE", **limit}]
    return edit


def _user(**ids):
    def edit(spec):
        spec["process"]["user"].update(ids)
    return edit


def _oom_score_adj(value):
    def edit(spec):
        spec["process"]["oomScoreAdj"] = value
    return edit


@pytest.mark.parametrize("edit,named", [
    (_hugepage_size, "invalid hugepage size 'bogus'"),
    (_rlimit(soft=2048, hard=1024), "process.rlimits RLIMIT_CORE: soft 2048 is above hard 1024"),
    (_user(uid=2**32 - 1), "process.user.uid"),  # (uid_t)-1: setresuid would leave us root
    (_user(gid=2**32 - 1), "process.user.gid"),
    (_user(additionalGids=[5, 2**32 - 1]), "process.user.additionalGids"),
    (_oom_score_adj(1001), "process.oomScoreAdj"),
    (_oom_score_adj(-2**63), "process.oomScoreAdj"),
], ids=["hugepage size", "rlimit soft above hard", "uid -1", "gid -1", "additional gid -1",
        "oomScoreAdj above 1000", "oomScoreAdj far below -1000"])
async def test_out_of_range_values_are_invalid_argument(agent, edit, named):
    """Finding 10: a domain error raised in the worker (the hugepage size, by the cgroup code)
    lost its code on the way back, and numbers the kernel's types cannot hold failed in the
    container's set-up: both INTERNAL."""
    spec = devtools.default_spec(agent.rootfs, ["/bin/true"])
    edit(spec)
    err = await create_error(agent, spec)
    assert err is not None and err.code == Code.INVALID_ARGUMENT and named in err.message, err
    assert "InvalidArgument" not in err.message and "Error:" not in err.message, err


async def test_rlimits_take_the_whole_uint64_range(agent):
    """Finding 10: an rlimit of 2^63 or more (2^64-1 is RLIM_INFINITY, what runtimes send for
    unlimited) made setrlimit raise OverflowError (INTERNAL).  They are valid: they reach the
    kernel as they are."""
    spec = devtools.default_spec(agent.rootfs, ["/bin/grep", "core file", "/proc/self/limits"])
    _rlimit(soft=2**63, hard=2**64 - 1)(spec)
    calls = harness.Calls(await agent.connect())
    try:
        await calls.create("r1", spec)
        await calls.StartContainer(container_id="r1")
        out = await calls.drain("r1", "r1")
        assert out.split()[-3:-1] == [b"9223372036854775808", b"unlimited"], out
        assert (await calls.WaitProcess(container_id="r1", exec_id="r1")).status == 0
    finally:
        await calls.RemoveContainer(container_id="r1")
        await calls.client.close()


@pytest.mark.parametrize("rules,named", [
    (b"*filter\n-A NOPE -j WHAT\nCOMMIT\n", "Chain 'WHAT' does not exist"),
    (b"garbage\n", "line 1 failed"),
    (b"*filter\n-A INPUT -j ACCEPT\n", "COMMIT expected"),
], ids=["unknown chain", "not rules", "no COMMIT"])
async def test_set_iptables_with_bad_rules_is_invalid_argument(agent, rules, named):
    """Finding 8 (SetIPTables): rules iptables-restore refused were answered INTERNAL.  They are
    the host's to fix: INVALID_ARGUMENT with iptables-restore's own words (not its usage hint)."""
    calls = harness.Calls(await agent.connect())
    try:
        with pytest.raises(RpcError) as err:
            await calls.SetIPTables(is_ipv6=False, data=rules)
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
        assert err.value.message.startswith("iptables-restore refused the rules: "), err.value
        assert named in err.value.message and "Try `" not in err.value.message, err.value
    finally:
        await calls.client.close()


LOCKING_POLICIES = {  # each compiles in rego-cpp, and would leave no data.agent_policy rule
    "no package": ("x", "must begin with 'package agent_policy'"),
    "a number": ("0", "must begin with 'package agent_policy'"),
    "another package": ("package foo\ndefault SetPolicyRequest := true\n", "must begin with 'package agent_policy'"),
    "a sub-package": ("package agent_policy.sub\ndefault SetPolicyRequest := true\n",
                      "must begin with 'package agent_policy'"),
    "package in a comment": ("# package agent_policy\n", "must begin with 'package agent_policy'"),
    # rego-cpp reads a C string: the rules after the NUL would silently be dropped
    "NUL": ("package agent_policy\n\0default SetPolicyRequest := true\n", "NUL byte"),
}
OPEN_POLICY = ("# the header may follow comments\npackage agent_policy\n\n"
               "default SetPolicyRequest := true\ndefault GuestDetailsRequest := true\n")


async def test_set_policy_without_a_package_is_refused():
    """Finding 9: SetPolicy took a document without 'package agent_policy' ("x" compiles in
    rego-cpp); the agent then refused every request, SetPolicy included, until it restarted.
    Each such policy is INVALID_ARGUMENT, with or without a current policy, and the agent goes on
    serving.  With a policy in force the NUL case is refused before the policy is asked (its
    engine cannot be given the string): INVALID_ARGUMENT too, naming the field."""
    harness.busybox_or_skip()
    agent = harness.AgentUnderTest(sandboxed=True, log_level="info")
    try:
        await agent.wait_ready()
        calls = harness.Calls(await agent.connect())
        try:
            for enforcing in (False, True):
                for text, named in LOCKING_POLICIES.values():
                    with pytest.raises(RpcError) as err:
                        await calls.SetPolicy(policy=text)
                    assert err.value.code == Code.INVALID_ARGUMENT, (enforcing, text, err.value)
                    if enforcing and "\0" in text:
                        named = "input.policy contains a NUL byte"
                    assert named in err.value.message, (enforcing, text, err.value)
                    await calls.GetGuestDetails()  # not locked
                await calls.SetPolicy(policy=OPEN_POLICY)
        finally:
            await calls.client.close()
    finally:
        rc = agent.stop()
        agent.cleanup()
        assert rc == 0


NUL_PATH = "/run/a\x00b"
NUL_REQUESTS = {  # rpc, fields, what the message names
    "GetVolumeStats": ("GetVolumeStats", {"volume_guest_path": NUL_PATH}, "volume_guest_path"),
    "ResizeVolume": ("ResizeVolume", {"volume_guest_path": NUL_PATH}, "volume_guest_path"),
    "AddSwapPath": ("AddSwapPath", {"path": NUL_PATH}, "swap: path"),
    "CopyFile": ("CopyFile", {"path": "/run/kata-containers/shared/containers/a\x00b"}, "CopyFile: path"),
    "ephemeral mount point": ("UpdateEphemeralMounts", {"storages": [
        {"driver": "ephemeral", "fstype": "tmpfs", "source": "tmpfs", "mount_point": NUL_PATH}]}, "mount point"),
    "ephemeral option": ("UpdateEphemeralMounts", {"storages": [
        {"driver": "ephemeral", "fstype": "tmpfs", "source": "tmpfs", "mount_point": "/run/nul-e1",
         "options": ["size=1m\x00,ro"]}]}, "option"),
    "storage source": ("CreateContainer", {"storages": [
        {"driver": "local", "source": NUL_PATH, "mount_point": "/run/nul-s1"}]}, "local storage: source"),
    "storage mount point": ("CreateContainer", {"storages": [
        {"driver": "local", "mount_point": NUL_PATH}]}, "local storage: mount point"),
    "guest hook path": ("CreateSandbox", {"guest_hook_path": NUL_PATH}, "guest_hook_path"),
}


@pytest.mark.parametrize("rpc,fields,named", NUL_REQUESTS.values(), ids=NUL_REQUESTS.keys())
async def test_paths_with_a_nul_byte_are_invalid_argument(agent, rpc, fields, named):
    """Finding 11: os.* raise ValueError for a NUL byte ('INTERNAL: ValueError: embedded null
    byte'), and ctypes would silently cut the string short (mount(2)'s fstype and data): every
    string the host hands the kernel is refused first, and nothing is made."""
    if rpc == "CreateContainer":
        fields = {"container_id": "n1", "exec_id": "n1",
                  "OCI": oci.spec_from_dict(devtools.default_spec(agent.rootfs, ["/bin/true"])), **fields}
    calls = harness.Calls(await agent.connect())
    try:
        with pytest.raises(RpcError) as err:
            await getattr(calls, rpc)(**fields)
        assert err.value.code == Code.INVALID_ARGUMENT, err.value
        assert named in err.value.message and "contains a NUL byte" in err.value.message, err.value
        for path in ("/run/nul-e1", "/run/nul-s1", "/run/a"):
            assert not os.path.lexists(agent.inside(path)), path
    finally:
        await calls.client.close()
