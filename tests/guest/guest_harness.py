"""Helpers for the guest-level RPC tests: a fake agent and a forked child (optionally in a
private mount namespace) for what must not touch the host."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from kagent.config import AgentConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fake_agent(**attrs: Any) -> SimpleNamespace:
    """What the guest service reads from the agent: config plus optional parts."""
    return SimpleNamespace(config=AgentConfig(), **attrs)


def run_in_child(fn: Callable[[], Any], *, mount_ns: bool = False) -> Any:
    """Run ``fn`` in a forked child (optionally in a private mount namespace); return its
    JSON-able result, or fail with the child's traceback.  The child never returns into
    pytest: it leaves with os._exit."""
    from kagent.runtime import syscalls

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            if mount_ns:
                syscalls.unshare(syscalls.CLONE_NEWNS)
                syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            out = {"ok": fn()}
        except BaseException:
            out = {"error": traceback.format_exc()}
            code = 1
        try:
            os.write(w, json.dumps(out, default=repr).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    assert raw, f"child died without a result (wait status {status:#x})"
    out = json.loads(raw)
    if "error" in out:
        pytest.fail("child failed:\n" + out["error"])
    return out["ok"]
