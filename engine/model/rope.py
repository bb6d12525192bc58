"""Rotary position embeddings, with the frequency schedules transformers defines.

transformers' `ROPE_INIT_FUNCTIONS` computes inverse frequencies for every scaling
type from the model config; we take those numbers as they are and only precompute
cos/sin tables once for all positions.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Types whose frequencies depend on the current sequence length are not a fixed
# table; we reject them at start rather than silently diverging.
_LENGTH_DEPENDENT = {"dynamic", "longrope"}


def rope_tables(config: PretrainedConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each [max_positions, head_dim] float32."""
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT:
        raise ValueError(f"rope type {rope_type!r} is not supported by coserve")
    if rope_type == "default":
        theta = params["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        attention_scaling = 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=torch.device("cpu"))
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())  # [max_positions, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, head_dim] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
