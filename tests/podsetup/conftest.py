"""The podsetup tests reuse the storage tests' private-mount-namespace runner
(tests/storage/storage_harness.py): only tests/ itself is on sys.path."""

from __future__ import annotations

import os
import sys

_STORAGE_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.insert(0, _STORAGE_TESTS)
