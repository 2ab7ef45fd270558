"""Fixtures for the observability tests."""

from __future__ import annotations

import pytest
from obs_harness import fork_test_zygote, stop_zygote


@pytest.fixture
def zygote():
    """A zygote forked before the test's loop exists, as the agent forks its own."""
    handle = fork_test_zygote()
    try:
        yield handle
    finally:
        stop_zygote(handle)
