"""Tiny random-weight Llama-family checkpoints, written to disk in Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def tiny_llama_config(**overrides) -> LlamaConfig:
    params = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    params = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, eos_token_id=2, architectures=["Qwen2ForCausalLM"],
    )
    params.update(overrides)
    return Qwen2Config(**params)


def write_tiny_model(path: Path, config, seed: int = 0) -> torch.nn.Module:
    """Save a random-weight model of `config` to `path`; returns the transformers reference (float32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves biases at zero; give them values so the loader must place them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.02)
    model.save_pretrained(path)
    return model
