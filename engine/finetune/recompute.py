"""Differentiable re-execution of one decoder layer, and the loss head, for the backward.

The forward of a training sequence ran in the engine's flat batch with no autograd,
keeping only each layer's input hidden states. The backward walks the layers from the
top: it re-runs layer l from its saved input with autograd on, through the model's own
layer code (engine/model/llama.py: full causal attention over the sequence, no cache,
base weights frozen, the job's LoRA parameters live), and backpropagates the gradient
that arrived from layer l + 1. So at any time autograd holds the graph of one layer of
one sequence, never the whole model. The layer computes in the model's compute type, as
the forward that saved its input did; the saved inputs (the residual stream) are
float32, and so are the LoRA parameters and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.finetune.lora_params import TrainableLoRA
from engine.model.llama import LlamaForCausalLM


def layer_forward(
    model: LlamaForCausalLM,
    index: int,
    x: torch.Tensor,  # [T, hidden] float32, positions 0..T-1 of one sequence
    cos: torch.Tensor,  # [T, head_dim], the compute type
    sin: torch.Tensor,
    lora: TrainableLoRA,
) -> torch.Tensor:  # [T, hidden] float32
    residual, delta = model.layers[index](x, None, cos, sin, None, None, lora)
    return residual + delta


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
        logits = model.compute_logits(model.norm(hidden[rows]))  # [rows, vocab] float32, differentiable
        loss = F.cross_entropy(logits, targets[rows], reduction="sum")
        loss.backward()
        total += loss.item()
    grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
    return total, grad
