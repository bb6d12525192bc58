"""Prometheus' own binaries for the deploy tests (Debian's `prometheus` package ships both)."""

from __future__ import annotations

import os
import shutil

import pytest


def _tool(name: str) -> str:
    """Absent, the test fails under CI (whose .ci/run installs it) and is skipped elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not on PATH (apt-get install prometheus provides it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _tool("prometheus")
