"""MKL-packed linear layers against F.linear, their native reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.model.packed_linear import (
    PackedLinear,
    bucket_rows,
    linear_on_row_buckets,
    mkl_packing_available,
    onednn_packing_available,
    pack_linears,
)

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not mkl_packing_available(torch.empty(1)), reason="torch built without MKL: layers run unpacked"),
]


@pytest.mark.parametrize("rows", [1, 5, 32, 77, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_matches_native_for_any_row_count(rows, with_bias):
    torch.manual_seed(rows)
    weight = torch.randn(96, 48)
    layer = PackedLinear(weight, torch.randn(96) if with_bias else None)
    x = torch.randn(rows, 48)
    torch.testing.assert_close(layer(x), layer.forward_native(x), atol=1e-5, rtol=1e-5)


def test_pack_linears_replaces_float32_layers_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    pack_linears(model)
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], nn.Linear)


@pytest.mark.skipif(not ops.bf16_linear_available(), reason="bf16_linear needs the C++ build on a CPU with AVX-512 or AVX2")
def test_panels_read_rounded_weights_up_to_their_row_count_only():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 48), torch.randn(96)
    layer = PackedLinear(weight, bias, panel_max_rows=16)
    rounded = weight.to(torch.bfloat16).float()
    for rows, expected_weight in ((1, rounded), (16, rounded), (17, weight), (80, weight)):
        x = torch.randn(rows, 48)
        torch.testing.assert_close(layer(x), F.linear(x, expected_weight, bias), atol=1e-5, rtol=1e-5)
    assert PackedLinear(weight, bias, panel_max_rows=4)(torch.randn(5, 48)).shape == (5, 96)


@pytest.mark.skipif(not ops.bf16_linear_available(), reason="bf16_linear needs the C++ build on a CPU with AVX-512 or AVX2")
def test_bfloat16_layer_with_panels_computes_in_float32_and_returns_bfloat16():
    """A bfloat16 model's small calls: float32 arithmetic on the same (bfloat16) weights,
    rounded once at the output; larger calls run the bfloat16 GEMM."""
    torch.manual_seed(1)
    weight, bias = torch.randn(40, 64).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(64, 40).to(torch.bfloat16))
    model[0].weight.data, model[0].bias.data = weight, bias
    pack_linears(model, panel_max_rows=8)
    layer = model[0]
    assert isinstance(layer, PackedLinear)
    x = torch.randn(8, 64).to(torch.bfloat16)
    exact = F.linear(x.float(), weight.float(), bias.float())
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), exact.to(torch.bfloat16), atol=0, rtol=0)
    x = torch.randn(9, 64).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=0, rtol=0)


def _skip_unless_onednn_packs(dtype: torch.dtype):
    if not onednn_packing_available(torch.empty(1, dtype=dtype)):
        pytest.skip(f"oneDNN does not pack {dtype} weights here (torch build or CPU)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_packed_weights_match_plain_call_up_to_their_row_count(dtype, with_bias):
    _skip_unless_onednn_packs(dtype)
    torch.manual_seed(2)
    weight = torch.randn(96, 48).to(dtype)
    bias = torch.randn(96).to(dtype) if with_bias else None
    layer = PackedLinear(weight, bias, onednn_max_rows=32)
    assert layer.onednn is not None
    for rows in (1, 7, 32, 33, 300):
        x = torch.randn(rows, 48).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, 96)
        torch.testing.assert_close(y, F.linear(x, weight, bias))


def test_float32_layer_keeps_mkl_copy_only_for_calls_onednn_does_not_take():
    _skip_unless_onednn_packs(torch.float32)
    weight = torch.randn(32, 16)
    assert PackedLinear(weight, None, onednn_max_rows=16).packed is not None
    layer = PackedLinear(weight, None, onednn_max_rows=256)
    assert layer.packed is None
    x = torch.randn(100, 16)  # past MKL's packed rows, within oneDNN's
    torch.testing.assert_close(layer(x), F.linear(x, weight))


def test_pack_linears_packs_bfloat16_for_onednn_only_when_asked():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    pack_linears(model)
    assert isinstance(model[0], nn.Linear)
    pack_linears(model, onednn_max_rows=64)
    assert isinstance(model[0], PackedLinear) == onednn_packing_available(model[0].weight)


def test_bfloat16_calls_run_on_few_row_counts_and_stay_on_their_path():
    # Every row count up to 2,048 maps to at most 96 shapes (oneDNN builds one primitive each).
    limit = 200
    buckets = {bucket_rows(rows, limit) for rows in range(1, 2049)}
    assert len(buckets) <= 96
    for rows in range(1, 2049):
        padded = bucket_rows(rows, limit)
        assert padded >= rows and padded - rows < 32
        assert (padded <= limit) == (rows <= limit)  # the packed path keeps its calls


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 255, 257, 300])
def test_row_buckets_give_the_plain_result_and_gradients(rows):
    torch.manual_seed(3)
    weight = torch.randn(40, 24).to(torch.bfloat16)
    bias = torch.randn(40).to(torch.bfloat16)
    x = torch.randn(rows, 24).to(torch.bfloat16).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = linear_on_row_buckets(x, weight, bias)
    y_ref = F.linear(x_ref, weight, bias)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_packed_bfloat16_layer_keeps_leading_dimensions():
    torch.manual_seed(4)
    weight = torch.randn(32, 16).to(torch.bfloat16)
    layer = PackedLinear(weight, None, onednn_max_rows=64)
    for shape in ((3, 5, 16), (2, 150, 16)):
        x = torch.randn(shape).to(torch.bfloat16)
        y = layer(x)
        assert y.shape == (*shape[:-1], 32)
        torch.testing.assert_close(y, F.linear(x, weight))
