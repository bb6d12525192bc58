"""`coserve serve` refuses to start with a clear message and a non-zero exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server.conftest import REPO

pytestmark = pytest.mark.server


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_missing_model_path(tmp_path):
    result = serve("--model", str(tmp_path / "absent"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    result = serve("--model", str(tmp_path))
    assert result.returncode != 0
    assert "unsupported architecture" in result.stderr


def test_invalid_setting_value():
    result = serve("--block-size", "3")
    assert result.returncode != 0
    assert "block_size must be a positive power of two" in result.stderr


def test_unsupported_kv_cache_type(tmp_path):
    """No kernel reads a float32 cache under bfloat16 queries: refused at start, by name."""
    result = serve("--dtype", "bfloat16", "--kv-cache-dtype", "float32", "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "kv_cache_dtype float32 under a bfloat16 model is not supported" in result.stderr
