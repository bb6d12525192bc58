"""The KV cache's type (`kv_cache_dtype`): what `auto` resolves to, which explicit types a
model takes, and the measurement that decides `auto` on a CPU."""

from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.attention import bfloat16_cache_is_no_slower
from engine.config import EngineConfig, resolve_kv_cache_dtype

pytestmark = pytest.mark.unit


def _never_measured() -> bool:
    raise AssertionError("the measurement should not run for this setting")


@pytest.mark.parametrize("measured", [True, False])
def test_auto_on_a_float32_cpu_model_follows_the_measurement(measured):
    resolved = resolve_kv_cache_dtype("auto", "auto", torch.float32, "cpu", True, lambda: measured)
    assert resolved == (torch.bfloat16 if measured else torch.float32)


@pytest.mark.parametrize(("dtype_setting", "dtype", "device", "kernels"), [
    ("float32", torch.float32, "cpu", True),  # an explicit float32 model keeps float32 throughout
    ("auto", torch.bfloat16, "cpu", True),  # a bfloat16 model's cache is bfloat16 already
    ("auto", torch.float32, "cpu", False),  # the mixed types need the CPU kernels
    ("auto", torch.bfloat16, "cuda", False),
])
def test_auto_is_the_models_type_elsewhere(dtype_setting, dtype, device, kernels):
    assert resolve_kv_cache_dtype("auto", dtype_setting, dtype, device, kernels, _never_measured) == dtype


def test_explicit_bfloat16_under_float32_on_the_cpu_kernels():
    assert resolve_kv_cache_dtype("bfloat16", "float32", torch.float32, "cpu", True, _never_measured) == torch.bfloat16
    assert resolve_kv_cache_dtype("float32", "auto", torch.float32, "cpu", True, _never_measured) == torch.float32


@pytest.mark.parametrize(("name", "dtype", "device", "kernels"), [
    ("float32", torch.bfloat16, "cpu", True),  # no kernel reads a float32 cache under bfloat16 queries
    ("bfloat16", torch.float32, "cpu", False),
    ("bfloat16", torch.float16, "cuda", False),
])
def test_unsupported_combinations_are_refused(name, dtype, device, kernels):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype(name, "auto", dtype, device, kernels, _never_measured)


def test_config_rejects_unknown_types(tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(model_dir=tmp_path, kv_cache_dtype="float16")


@pytest.mark.skipif(not ops.cpu_kernels_available(), reason="C++ CPU kernels did not build here")
def test_the_measurement_times_the_decode_kernel_on_both_caches(monkeypatch):
    """It calls the kernel with float32 queries over bfloat16 and float32 caches, alternately."""
    seen = []
    real = ops.paged_decode_attention

    def recording(out, q, k_cache, *args):
        seen.append(k_cache.dtype)
        real(out, q, k_cache, *args)

    monkeypatch.setattr(ops, "paged_decode_attention", recording)
    torch.manual_seed(0)
    before = torch.randn(3)
    torch.manual_seed(0)
    assert isinstance(bfloat16_cache_is_no_slower(9, 3, 64, 16), bool)
    assert torch.equal(torch.randn(3), before), "the measurement must leave the global generator alone"
    assert set(seen) == {torch.bfloat16, torch.float32}
    assert seen[:4] == [torch.bfloat16] * 4 and seen[4:8] == [torch.float32] * 4  # four layers each, in turn
