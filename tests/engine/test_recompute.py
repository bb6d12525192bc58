"""The finetuning backward's layer recompute, through the model's own layer code.

float32 recompute equals PEFT training (test_finetune_equivalence.py); these tests cover
what that one does not: the bfloat16 model that serving runs on AMX, whose layers are
packed for oneDNN and fused kernels (no gradients there), must recompute on the
differentiable paths and give the float32 gradients to bfloat16 rounding.
"""

from __future__ import annotations

import pytest
import torch

from engine.finetune.lora_params import LoRAConfig, TrainableLoRA
from engine.finetune.recompute import layer_forward
from engine.model.loader import load_model
from engine.model.rope import rope_tables
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny

TOKENS = 37  # not a multiple of the GEMM row buckets: the padded rows must not leak in


def layer_gradients(model, lora: TrainableLoRA, x: torch.Tensor, grad: torch.Tensor, layer: int):
    """(layer output, d/dx, d/d each LoRA parameter that got a gradient) of one recomputed layer."""
    dtype = model.embed_tokens.weight.dtype
    cos, sin = (t[:TOKENS].to(dtype) for t in rope_tables(model.config, model.head_dim, 64))
    lora.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = layer_forward(model, layer, x, cos, sin, lora)
        y.backward(grad)
    return y.detach(), x.grad, {name: p.grad.clone() for name, p in lora.named_parameters() if p.grad is not None}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("onednn_rows", [0, 256], ids=["plain", "onednn-packed"])
def test_bfloat16_recompute_gradients_match_float32(tmp_path, onednn_rows):
    config = tiny_llama_config()
    write_tiny_model(tmp_path, config)
    reference = load_model(tmp_path, torch.float32)
    model = load_model(tmp_path, torch.bfloat16, onednn_max_rows=onednn_rows)
    model.set_fused_kernels(True)  # as the runner leaves a serving model
    lora = TrainableLoRA(model.lora_layout(), LoRAConfig(rank=8, alpha=16), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the deltas (and d/dA) something to carry
        for b in lora.b.values():
            b.normal_(std=0.05, generator=gen)
    x = torch.randn(TOKENS, config.hidden_size, generator=gen)
    grad = torch.randn(TOKENS, config.hidden_size, generator=gen)
    for layer in range(config.num_hidden_layers):
        y_ref, dx_ref, dp_ref = layer_gradients(reference, lora, x, grad, layer)
        y, dx, dp = layer_gradients(model, lora, x, grad, layer)
        assert y.dtype == torch.float32 and dx.dtype == torch.float32
        # What the layer adds, to its output and to the gradient passing through.
        assert relative_error(y - x, y_ref - x) < 2e-2
        assert relative_error(dx - grad, dx_ref - grad) < 3e-2
        # Exactly the layer's own adapter learns: 7 projections x (A, B).
        assert dp.keys() == dp_ref.keys() and len(dp) == 2 * 7
        assert all(name.split(".")[1].startswith(f"{layer}_") and dp[name].abs().sum() > 0 for name in dp)
        for name in dp:
            assert relative_error(dp[name], dp_ref[name]) < 3e-2, name


def test_recompute_rows_are_independent_of_padding(tmp_path):
    """A sequence's recompute gives the same output and gradients whether or not its
    length needs padded GEMM rows (37 rows run as 40 in bfloat16): the padding is cut."""
    config = tiny_llama_config()
    write_tiny_model(tmp_path, config)
    model = load_model(tmp_path, torch.float32)
    lora = TrainableLoRA(model.lora_layout(), LoRAConfig(rank=8, alpha=16), seed=0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(TOKENS, config.hidden_size, generator=gen)
    grad = torch.randn(TOKENS, config.hidden_size, generator=gen)
    y, dx, _ = layer_gradients(model, lora, x, grad, 0)
    # Causal: the first 36 positions do not see the 37th, so recomputing 36 tokens must
    # reproduce their rows exactly.
    cos, sin = (t[: TOKENS - 1] for t in rope_tables(model.config, model.head_dim, 64))
    with torch.enable_grad():
        short = layer_forward(model, 0, x[:-1], cos, sin, lora)
    torch.testing.assert_close(short, y[:-1], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(dx).all()
