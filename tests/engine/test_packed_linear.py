"""MKL-packed linear layers against F.linear, their native reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.model.packed_linear import PackedLinear, mkl_packing_available, pack_linears

pytestmark = pytest.mark.skipif(
    not mkl_packing_available(torch.empty(1)), reason="torch built without MKL: layers run unpacked"
)


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


@pytest.mark.skipif(not ops.bf16_linear_available(), reason="bf16_linear needs the C++ build on an AVX-512 CPU")
def test_decode_bf16_reads_rounded_weights_up_to_16_rows_only():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 48), torch.randn(96)
    layer = PackedLinear(weight, bias, decode_bf16=True)
    rounded = weight.to(torch.bfloat16).float()
    for rows, expected_weight in ((1, rounded), (16, rounded), (17, weight), (80, weight)):
        x = torch.randn(rows, 48)
        torch.testing.assert_close(layer(x), F.linear(x, expected_weight, bias), atol=1e-5, rtol=1e-5)
