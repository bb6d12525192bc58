"""`power_mode` on a live server: apply locks clocks and gives them back on SIGTERM;
apply without a GPU refuses to start with the reason."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import REPO, start_server

pytestmark = pytest.mark.server


def test_apply_mode_resets_clocks_when_the_server_is_terminated(tmp_path):
    live = start_server(tmp_path, "--power-device", "simulated", "--power-mode", "apply")
    try:
        reply = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)
        assert reply.status_code == 200
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
        assert 'mode="apply"' in metrics
    finally:
        live.stop()  # SIGTERM, as an init system sends
    log = live.log_path.read_text()
    assert "power_mode apply: locking SM clocks of simulated H100 SXM works" in log
    assert "SM clocks of simulated H100 SXM reset to the driver's control" in log


def test_apply_mode_without_a_gpu_fails_at_start_with_the_reason(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir", str(tmp_path),
         "--power-mode", "apply"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "power_mode apply needs a GPU" in result.stdout + result.stderr
