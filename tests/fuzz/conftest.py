"""Fuzzing (hypothesis): short and deterministic in the normal suite, long on demand.

Every fuzz target takes its settings from ``reliability_harness.fuzz_settings``:
profile "kagent-ci" in the normal suite (derandomized, no example database: CI
runs the same examples every time) or "kagent-fuzz" with ``make fuzz`` /
KAGENT_FUZZ=long (random, with an example database in ~/.cache/kagent-fuzz so a
failure found once is replayed first next time; $KAGENT_FUZZ_EXAMPLES sets the
examples per target).  The global hypothesis profile is left alone.  Executions
per target are printed at the end of the run.
"""

from __future__ import annotations

import reliability_harness as harness


def pytest_terminal_summary(terminalreporter):
    harness.print_report(terminalreporter)
