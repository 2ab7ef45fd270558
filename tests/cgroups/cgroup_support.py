"""Helpers for the cgroup tests (imported by name: a module of this name exists only here)."""

from __future__ import annotations

import os

import pytest

from kagent.cgroups.paths import Layout

NO_EXTENSIONS = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def v1_layout() -> Layout:
    layout = Layout.discover()
    if layout.driver != "v1":
        pytest.skip("needs cgroup v1 hierarchies")
    return layout


def v2_layout() -> Layout:
    """This machine's cgroup2 as a v2-only layout (the v1 hierarchies stay untouched)."""
    layout = Layout.discover()
    if not layout.unified:
        pytest.skip("needs a cgroup2 mount")
    return Layout("v2", {}, layout.unified)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def enter_in_child(m) -> str:
    """fork; the child calls m.enter() and sends back its /proc/self/cgroup (or the error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            m.enter()
            with open("/proc/self/cgroup") as fh:
                os.write(w, fh.read().encode())
        except BaseException as exc:
            os.write(w, f"error {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        out = fh.read()
    os.waitpid(pid, 0)
    return out
