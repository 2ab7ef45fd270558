"""Fault injection: the agent goes on and leaves nothing behind (helpers: tests/fuzz/reliability_harness.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))

import reliability_harness as harness  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    harness.print_report(terminalreporter)
