"""Start-up loads only what serving needs: the heavy libraries and the parts that a pod may
never use are imported by the first RPC, scrape or storage that needs them (the agent must
accept within 150 ms of exec: bench/startup.py measures it).

Checked on ``sys.modules`` of a fresh interpreter, never by timing: a plain import, and an
agent started (``Agent.run``, as ``python -m kagent`` runs it) until its socket accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Each costs start-up 5 to 80 ms; what loads it, and when.
HEAVY = {
    "prometheus_client": "GetMetrics or a scrape of agent.metrics_addr (kagent.metrics)",
    "pyroute2": "the first network RPC (kagent.network)",
    "regopy": "a policy to enforce (kagent.policy)",
    "opentelemetry": "agent.trace (kagent.tracing)",
    "tomllib": "a configuration file (kagent.config)",
}
# kagent's own: loaded with the first storage of their kind / the first cgroup operation.
LAZY = ("kagent.storage.block", "kagent.storage.overlay", "kagent.storage.ephemeral",
        "kagent.storage.sharedfs", "kagent.storage.local", "kagent.storage.bind",
        "kagent.cgroups.manager", "kagent.cgroups.mount", "kagent.cgroups.hotplug",
        "kagent.cgroups.paths", "kagent.init")

_STARTED_AGENT = textwrap.dedent("""
    import asyncio, json, socket, sys
    import uvloop
    from kagent import config
    from kagent.agent import Agent

    async def main():
        agent = Agent(config.load(cmdline="quiet", environ={}, overrides={"server_addr": sys.argv[1]}), None)
        task = asyncio.create_task(agent.run())
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(sys.argv[1][len("unix://"):])
                    break
                except OSError:
                    assert not task.done(), "the agent stopped before accepting"
            await asyncio.sleep(0.01)
        at_start = sorted(sys.modules)
        await agent.metrics.gather()  # a GetMetrics: only now prometheus-client
        after_scrape = sorted(sys.modules)
        agent.stop("test")
        await task
        print(json.dumps([at_start, after_scrape]))

    uvloop.run(main())
""")


def _loaded(modules: list[str], names) -> list[str]:
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_agent_loads_nothing_heavy():
    code = ("import json, sys, kagent.agent, kagent.service.containers, kagent.service.guest, "
            "kagent.service.network, kagent.service.policy, kagent.service.sandbox; "
            "print(json.dumps(sorted(sys.modules)))")
    modules = json.loads(_run(["-c", code]))
    assert _loaded(modules, HEAVY) == [], {n: HEAVY[n] for n in _loaded(modules, HEAVY)}
    assert _loaded(modules, LAZY) == []


def test_a_started_agent_has_loaded_nothing_heavy(tmp_sock_dir):
    addr = "unix://" + os.path.join(tmp_sock_dir, "agent.sock")
    out = _run(["-c", _STARTED_AGENT, addr], env={"KAGENT_RUN_DIR": os.path.join(tmp_sock_dir, "run")})
    at_start, after_scrape = json.loads(out.splitlines()[-1])
    assert _loaded(at_start, HEAVY) == [], {n: HEAVY[n] for n in _loaded(at_start, HEAVY)}
    assert _loaded(at_start, LAZY) == []
    assert "kagent.service.guest" in at_start  # it did build its services
    assert "prometheus_client" in after_scrape  # and the metrics still load when asked for


def test_the_lazy_cgroups_names_resolve():
    code = ("import kagent.cgroups as c, sys; [getattr(c, n) for n in c.__all__]; "
            "print(sorted(set(c.__all__) - set(vars(c))))")
    assert _run(["-c", code]).strip() == "[]"
