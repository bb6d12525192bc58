"""Differentiable re-execution of one decoder layer, and the loss head, for the backward.

The forward of a training sequence ran in the engine's flat batch with no autograd,
keeping only each layer's input hidden states. The backward walks the layers from the
top: it re-runs layer l from its saved input with autograd on (full causal attention
over the sequence, base weights frozen, the job's LoRA parameters live), and
backpropagates the gradient that arrived from layer l + 1. So at any time autograd
holds the graph of one layer of one sequence, never the whole model.

The math mirrors engine/model/llama.py (native paths: F.linear, SDPA): the
equivalence test against PEFT training checks that the two agree. Everything but the
frozen base matmuls runs in float32, whatever the model's compute type: the saved layer
inputs (the residual stream) are float32, and so are the LoRA parameters and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.finetune.lora_params import TrainableLoRA
from engine.lora.layout import LoRATarget
from engine.model.llama import DOWN_PROJ, GATE_UP_PROJ, O_PROJ, QKV_PROJ, DecoderLayer, LlamaForCausalLM
from engine.model.packed_linear import linear_on_row_buckets
from engine.model.rope import apply_rope


def _projection(module, x: torch.Tensor, target: LoRATarget, layer: int, lora: TrainableLoRA) -> torch.Tensor:
    """Base projection (frozen, in the model's compute type) plus the trainable LoRA delta
    of the adapted parts (float32, like its parameters); returns float32 [T, out].

    All parts in two matmuls, the second accumulating into the base output: per-part
    matmuls and a concatenation of their deltas cost more in calls and passes over
    [T, out] than the arithmetic of a rank-16 adapter."""
    y = linear_on_row_buckets(x.to(module.weight.dtype), module.weight, module.bias).float()  # [T, out]
    stacked = lora.stacked(layer, target)
    if stacked is None:
        return y
    a, b = stacked  # [parts x r, in], block diagonal [out, parts x r]
    return torch.addmm(y, x.float() @ a.T, b.T, alpha=lora.config.scaling)


def layer_forward(
    model: LlamaForCausalLM,
    index: int,
    x: torch.Tensor,  # [T, hidden], positions 0..T-1 of one sequence
    cos: torch.Tensor,  # [T, head_dim]
    sin: torch.Tensor,
    lora: TrainableLoRA,
) -> torch.Tensor:  # [T, hidden]
    layer: DecoderLayer = model.layers[index]
    targets = {t.name: t for t in lora.layout.targets}
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    qkv = _projection(attn.qkv_proj, h, targets[QKV_PROJ], index, lora)
    qk = qkv[:, : attn.q_size + attn.kv_size].view(-1, attn.num_heads + attn.num_kv_heads, attn.head_dim)
    q, k = apply_rope(qk, cos, sin).split([attn.num_heads, attn.num_kv_heads], dim=1)
    v = qkv[:, attn.q_size + attn.kv_size :].view(-1, attn.num_kv_heads, attn.head_dim)
    # As [1, heads, T, head_dim]: with a batch dimension SDPA takes its fused CPU kernel
    # (forward and backward); without one, the unfused math path.
    out = F.scaled_dot_product_attention(
        *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), is_causal=True, scale=attn.scale, enable_gqa=True
    )  # [1, heads, T, head_dim]
    out = out[0].transpose(0, 1).reshape(-1, attn.q_size)
    x = x + _projection(attn.o_proj, out, targets[O_PROJ], index, lora)
    mlp = layer.mlp
    h = layer.post_attention_layernorm(x)
    gate, up = _projection(mlp.gate_up_proj, h, targets[GATE_UP_PROJ], index, lora).split(mlp.intermediate, dim=-1)
    return x + _projection(mlp.down_proj, F.silu(gate) * up, targets[DOWN_PROJ], index, lora)


def loss_sum(model: LlamaForCausalLM, hidden: torch.Tensor, targets: torch.Tensor, rows_per_chunk: int = 64):
    """Summed token cross-entropy of `hidden` [n, hidden] (last layer output, pre-norm,
    at positions that carry a target) against `targets` [n], computed in row chunks so
    the [rows, vocab] logits stay small; returns (loss value, d loss / d hidden [n, hidden]).
    Positions without a target add nothing to the loss or its gradient, so callers
    leave them out rather than pay for their logits."""
    hidden = hidden.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits = linear_on_row_buckets(model.norm(hidden[rows]), model.lm_head.weight, None).float()  # [rows, vocab]
        loss = F.cross_entropy(logits, targets[rows], reduction="sum")
        loss.backward()
        total += loss.item()
    grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
    return total, grad
