"""Agent policy: the cost of one decision, against the agent with no policy.

    python -m bench.bench_policy [--quick]

A policy shaped like a generated one (every request has a rule; CreateContainerRequest
matches the request against a list of allowed containers: args, image, env, mounts,
namespaces), decided for a CreateContainerRequest carrying a full OCI spec and for a
small request (ReadStdout's ReadStreamRequest).  The time is split where it goes:
request → JSON-like input (Python), input → rego-cpp term (ctypes calls plus rego-cpp's
own conversion), the query, and what is left (prints capture, result parsing, locking).
Compiling the policy (once per load, and again when ops change its data) is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from kagent import devtools, oci, policy
from kagent.protocols import agent_pb2

TARGET_US = 200.0

_ALLOWED_REQUESTS = (
    "CloseStdinRequest", "DestroySandboxRequest", "GetOOMEventRequest", "GuestDetailsRequest",
    "ListInterfacesRequest", "ListRoutesRequest", "OnlineCPUMemRequest", "ReadStreamRequest",
    "RemoveContainerRequest", "SignalProcessRequest", "StartContainerRequest", "StatsContainerRequest",
    "TtyWinResizeRequest", "UpdateInterfaceRequest", "UpdateRoutesRequest", "WaitProcessRequest",
    "WriteStreamRequest", "CreateSandboxRequest", "SetGuestDateTimeRequest", "AddARPNeighborsRequest",
)


def bench_policy(containers: int = 8) -> str:
    """A generated-looking policy with ``containers`` allowed containers in its data."""
    rules = "\n".join(f"default {r} := {'true' if r in _ALLOWED_REQUESTS else 'false'}"
                      for r in policy.RULES if r not in ("CreateContainerRequest", policy.ALLOW_FAILURES_RULE))
    allowed = ",\n".join(
        f'{{"image": "registry.example/app{i}:1.{i}", "args": ["/bin/app{i}", "--port", "80{i:02d}"],'
        f' "env": ["^PATH=", "^TERM=", "^HOSTNAME=", "^APP_{i}_[A-Z]+="],'
        f' "mounts": ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/tmp", "/etc/hosts"],'
        f' "namespaces": ["pid", "network", "ipc", "uts", "mount"]}}'
        for i in range(containers))
    return f"""package agent_policy

import rego.v1

{rules}
default CreateContainerRequest := false
default AllowRequestsFailingPolicy := false

policy_data := {{"containers": [
{allowed}
]}}

CreateContainerRequest if {{
    i_oci := input.OCI
    is_null(i_oci.Hooks)
    some p in policy_data.containers
    i_oci.Annotations["io.kubernetes.cri.image-name"] == p.image
    print("CreateContainerRequest: trying", p.image)
    i_oci.Process.Args == p.args
    every var in i_oci.Process.Env {{ allowed_env(var, p.env) }}
    every m in i_oci.Mounts {{ m.destination in p.mounts }}
    [ns.Type | some ns in i_oci.Linux.Namespaces] == p.namespaces
    startswith(i_oci.Root.Path, "/run/kata-containers/shared/containers/")
    print("CreateContainerRequest: allowed")
}}

allowed_env(var, patterns) if {{
    some pattern in patterns
    regex.match(pattern, var)
}}
"""


def full_request(image_index: int = 5) -> agent_pb2.CreateContainerRequest:
    cid = "9f2c1e4d7b8a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"
    spec = devtools.default_spec(f"/run/kata-containers/shared/containers/{cid}/rootfs",
                                 [f"/bin/app{image_index}", "--port", f"80{image_index:02d}"])
    spec["process"]["env"] += [f"HOSTNAME=pod-{image_index}", f"APP_{image_index}_MODE=prod"]
    spec["mounts"].append({"destination": "/etc/hosts", "type": "bind",
                           "source": f"/run/kata-containers/shared/containers/{cid}-hosts",
                           "options": ["rbind", "rprivate", "ro"]})
    spec["annotations"] = {
        "io.kubernetes.cri.image-name": f"registry.example/app{image_index}:1.{image_index}",
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": f"app{image_index}",
        "io.kubernetes.cri.sandbox-id": cid,
        "io.kubernetes.cri.sandbox-name": "pod-0",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.katacontainers.pkg.oci.bundle_path": f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{cid}",
    }
    spec["linux"]["resources"] = {"memory": {"limit": 268435456}, "cpu": {"shares": 512, "quota": 50000,
                                                                           "period": 100000}}
    spec["linux"]["cgroupsPath"] = f"/kubepods/burstable/pod0/{cid}"
    return agent_pb2.CreateContainerRequest(container_id=cid, exec_id=cid, OCI=oci.spec_from_dict(spec),
                                            sandbox_pidns=False)


def _per_call(fn: Callable[[], Any], count: int, repeat: int) -> float:
    """Best mean time of one call, in µs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def _decisions(ap: policy.AgentPolicy, request, count: int, repeat: int) -> tuple[float, Any]:
    """Best mean µs of ``ap.check(request)`` awaited ``count`` times in one coroutine."""
    async def go() -> tuple[float, Any]:
        best, decision = float("inf"), None
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(count):
                decision = await ap.check(request)
            best = min(best, (time.perf_counter() - start) / count)
        return best * 1e6, decision

    return asyncio.run(go())


def _breakdown(engine: policy.Engine, request, rule: str, count: int, repeat: int) -> dict[str, float]:
    doc = policy.request_input(request)
    rs, lib = engine._rs, engine._rs.rego  # the engine's own steps, one at a time

    def set_input() -> None:
        handle = lib.regoNewInput()
        policy._put(lib, handle, doc)
        rs.rego_set_input(engine._query._impl, handle)
        lib.regoFreeInput(handle)

    def query() -> None:
        with engine._stdout.captured():
            out = lib.regoBundleQueryEntrypoint(engine._query._impl, engine._bundle._impl,
                                                f"{policy.PACKAGE}/{rule}".encode())
            rs.rego_output_string(out)
            lib.regoFreeOutput(out)

    ap = policy.AgentPolicy(engine)
    total, decision = _decisions(ap, request, count, repeat)
    to_json = _per_call(lambda: policy.request_input(request), count, repeat)
    term = _per_call(set_input, count, repeat)
    q = _per_call(query, count, repeat)
    return {"total_us": total, "allowed": decision.allowed, "to_json_us": to_json, "set_input_us": term,
            "query_us": q, "other_us": max(0.0, total - to_json - term - q)}


def run(quick: bool = False) -> dict:
    count, repeat = (50, 3) if quick else (300, 5)
    text = bench_policy()
    start = time.perf_counter()
    engine = policy.Engine(text)
    compile_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    engine.apply([{"op": "add", "path": "/pstate/sandbox_name", "value": "pod-0"}])
    ops_ms = (time.perf_counter() - start) * 1e3

    full = full_request()
    small = agent_pb2.ReadStreamRequest(container_id=full.container_id, exec_id=full.exec_id, len=32768)
    baseline, _ = _decisions(policy.AgentPolicy(), small, count, repeat)
    # the engine's fixed costs: the same request against a policy that just says yes
    simple = policy.Engine("package agent_policy\n\ndefault CreateContainerRequest := true\n")
    return {
        "policy_bytes": len(text),
        "compile_ms": compile_ms,
        "ops_recompile_ms": ops_ms,
        "create_container": {"request_bytes": full.ByteSize(),
                             **_breakdown(engine, full, "CreateContainerRequest", count, repeat)},
        "create_container_simple_policy": {
            "request_bytes": full.ByteSize(),
            **_breakdown(simple, full, "CreateContainerRequest", count, repeat)},
        "read_stream": {"request_bytes": small.ByteSize(),
                        **_breakdown(engine, small, "ReadStreamRequest", count * 4, repeat)},
        "no_policy_us": baseline,
        "target_us": TARGET_US,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decisions and repeats")
    r = run(parser.parse_args().quick)
    print(f"policy: {r['policy_bytes']} B of Rego, compiled in {r['compile_ms']:.1f} ms "
          f"(again after ops: {r['ops_recompile_ms']:.1f} ms)")
    print(f"  baseline, no policy: {r['no_policy_us']:.1f} µs per check")
    for name in ("create_container", "create_container_simple_policy", "read_stream"):
        d = r[name]
        verdict = "within" if d["total_us"] <= r["target_us"] else "OVER"
        print(f"  {name:30} {d['request_bytes']:5} B request: {d['total_us']:7.1f} µs per decision "
              f"({verdict} the {r['target_us']:.0f} µs target; allowed={d['allowed']})")
        print(f"      to JSON {d['to_json_us']:6.1f}  input term {d['set_input_us']:6.1f}  "
              f"query {d['query_us']:6.1f}  other {d['other_us']:6.1f} µs")


if __name__ == "__main__":
    main()
