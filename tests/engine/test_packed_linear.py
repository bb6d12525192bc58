"""MKL-packed linear layers against F.linear, their native reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
