"""OCI lifecycle hooks: run each with the container's state JSON on stdin, within its timeout.

Where each kind runs (runtime-spec config.md "POSIX-platform Hooks"):
- prestart, createRuntime: by the worker (runtime namespace), after the
  container's namespaces and mounts exist, before pivot_root;
- createContainer: by the container's child, in its mount namespace, before
  pivot_root (the path resolves in the runtime's filesystem);
- startContainer: by the container's init after StartContainer, just before
  the exec (path resolves in the container);
- poststart: by the worker after the init exec'd; poststop: by the worker
  after the container is gone (the caller's ``run(..., "poststop", ...)``).
A failing prestart/createRuntime/createContainer/startContainer hook fails the
container; poststart and poststop failures are warnings (the spec says so).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable

from .errors import InvalidSpec, SetupError

Warn = Callable[[str], None]

KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
#: failures of these only warn
WARN_ONLY = ("poststart", "poststop")
_OUTPUT_LIMIT = 4096


def state(spec: dict, container_id: str, status: str, pid: int, bundle: str) -> dict:
    """The OCI state of the container, as hooks receive it on stdin."""
    return {
        "ociVersion": spec.get("ociVersion", "1.0.2"),
        "id": container_id,
        "status": status,
        "pid": pid,
        "bundle": bundle,
        "annotations": dict(spec.get("annotations") or {}),
    }


def hooks_of(spec: dict, kind: str) -> list[dict]:
    return list((spec.get("hooks") or {}).get(kind) or [])


def validate(spec: dict) -> None:
    """Reject malformed hooks before anything is created."""
    for kind, entries in (spec.get("hooks") or {}).items():
        if kind not in KINDS:
            raise InvalidSpec("hooks", f"hooks: unknown hook kind {kind!r}")
        for hook in entries or []:
            path = hook.get("path") or ""
            if not os.path.isabs(path):
                raise InvalidSpec("hooks", f"hook {kind}: path {path!r} must be absolute", path=path)
            timeout = hook.get("timeout")
            if timeout is not None and int(timeout) <= 0:
                raise InvalidSpec(
                    "hooks",
                    f"hook {kind} {path}: timeout must be positive, not {timeout}",
                    path=path,
                )


def run_one(kind: str, index: int, hook: dict, st: dict) -> None:
    path = hook["path"]
    args = list(hook.get("args") or [path])
    env = dict(e.split("=", 1) for e in hook.get("env") or [] if "=" in e)
    timeout = hook.get("timeout")
    what = f"hook {kind}[{index}] {path}"
    try:
        proc = subprocess.run(
            args,
            executable=path,
            input=json.dumps(st).encode(),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=None if timeout is None else int(timeout),
            close_fds=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess.run has killed (SIGKILL) and reaped the hook by now
        raise SetupError(
            what, f"{what}: timed out after {timeout}s", path=path, errno=errno.ETIMEDOUT
        ) from exc
    except OSError as exc:
        raise SetupError.from_oserror(what, exc, path) from exc
    if proc.returncode != 0:
        out = proc.stdout[-_OUTPUT_LIMIT:].decode(errors="replace").strip()
        how = (
            f"exit status {proc.returncode}"
            if proc.returncode > 0
            else f"signal {-proc.returncode}"
        )
        raise SetupError(
            what, f"{what}: failed with {how}" + (f": {out}" if out else ""), path=path
        )


def run(spec: dict, kind: str, st: dict, warn: Warn | None = None) -> None:
    """Run every hook of ``kind`` in order; stop at the first failure (warn for post* hooks)."""
    for i, hook in enumerate(hooks_of(spec, kind)):
        try:
            run_one(kind, i, hook, st)
        except SetupError as exc:
            if kind in WARN_ONLY and warn is not None:
                warn(str(exc))
                continue
            raise
