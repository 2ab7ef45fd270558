"""kagent's entry point.

Everything that forks is decided here, from argv, before any event loop or
thread exists: the zygote is forked first, then the supervisor's loop starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from kagent import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kagent", description="Kata Containers guest agent (Python)")
    p.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    p.add_argument("--cmdline-file", metavar="FILE",
                   help="read agent.* options from FILE instead of /proc/cmdline")
    p.add_argument("--server-addr", metavar="URI", help="listen address (unix:///p, unix://@n, vsock://C:P, serial://N)")
    p.add_argument("--log-level", metavar="LEVEL", help="trace, debug, info, warning, error, critical")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON and exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def allow_core_dumps() -> list[str]:
    """Developer mode: let the agent dump core (where: /proc/sys/kernel/core_pattern)."""
    problems = []
    try:
        import ctypes

        PR_SET_DUMPABLE = 4
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
            problems.append(f"prctl(PR_SET_DUMPABLE): errno {ctypes.get_errno()}")
    except OSError as exc:
        problems.append(f"prctl(PR_SET_DUMPABLE): {exc}")
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    except (OSError, ValueError) as exc:
        problems.append(f"setrlimit(RLIMIT_CORE): {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    if os.getpid() == 1:
        # The guest's init: PID-1 duties (mounts, modules, reaping, power-off) happen in
        # kagent.init, which runs this main again in its child.
        from kagent import init

        return init.main(argv)
    args = _parser().parse_args(argv)
    if args.version:
        print(f"kagent version {__version__} (api version: 0.0.1, type: python)")
        return 0

    from kagent import config as kconfig
    from kagent import log as klog

    overrides = {k: v for k, v in (("server_addr", args.server_addr), ("log_level", args.log_level)) if v}
    cfg = kconfig.load(cmdline_file=args.cmdline_file, config_file=args.config, overrides=overrides)
    if args.print_config:
        print(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True))
        return 0

    klog.setup(cfg.log_level)
    log = klog.get_logger("main")
    for warning in cfg.warnings:
        log.warning("configuration", problem=warning)
    if cfg.dev_mode:
        for problem in allow_core_dumps():
            log.warning("developer mode: core dumps", problem=problem)

    import kagent._fast as fast
    from kagent.zygote import fork_zygote

    zygote = fork_zygote()  # before the loop and before any thread

    import uvloop

    from kagent.agent import Agent

    log.info("starting", version=__version__, fast_path=fast.status())
    return uvloop.run(Agent(cfg, zygote).run())


if __name__ == "__main__":
    sys.exit(main())
