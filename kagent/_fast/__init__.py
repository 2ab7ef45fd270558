"""The compiled fast path (Cython), each module with a pure-Python twin.

One switch selects the twins: ``KAGENT_NO_EXTENSIONS=1``.  Otherwise a
compiled module that fails to import is recorded here (never hidden): the
twin is used, ``status()`` says so, and the guard test in the suite fails.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

DISABLED = os.environ.get("KAGENT_NO_EXTENSIONS") == "1"

#: compiled modules that were asked for, by name → module, or the import error text
_loaded: dict[str, ModuleType | str] = {}


def load(name: str) -> ModuleType | None:
    """Import ``kagent._fast.<name>``; None when disabled or not built."""
    if DISABLED:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"kagent._fast.{name}")
        except ImportError as exc:
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    mod = _loaded[name]
    return mod if isinstance(mod, ModuleType) else None


def failures() -> dict[str, str]:
    """Compiled modules that were asked for but did not load, with the reason."""
    return {k: v for k, v in _loaded.items() if isinstance(v, str)}


def status() -> str:
    """One line for logs and the build: compiled or pure, and why."""
    if DISABLED:
        return "pure-Python twins (KAGENT_NO_EXTENSIONS=1)"
    import glob

    here = os.path.dirname(__file__)
    built = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(here, "*.so")))
    missing = failures()
    if missing:
        return "DEGRADED: " + "; ".join(f"{k}: {v}" for k, v in missing.items())
    return "compiled: " + (", ".join(built) if built else "none built")
