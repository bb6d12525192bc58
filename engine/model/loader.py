"""Load a Hugging Face Llama-family checkpoint (safetensors) into our fused layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from engine.model.llama import LlamaForCausalLM
from engine.model.packed_linear import pack_linears
from engine.parallel.tensor_parallel import TensorParallel, shard_model
from engine.model_files import check_architecture


class _Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, read lazily by name."""

    def __init__(self, model_dir: Path):
        self._handles = [safe_open(str(f), framework="pt") for f in sorted(model_dir.glob("*.safetensors"))]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise ValueError(f"checkpoint is missing tensor {key!r}")
        return self._where[key].get_tensor(key)

    def cat(self, keys: list[str]) -> torch.Tensor:
        return torch.cat([self.get(k) for k in keys], dim=0)


def _state_dict(config: PretrainedConfig, ckpt: _Checkpoint, tied: bool) -> dict[str, torch.Tensor]:
    state = {"embed_tokens.weight": ckpt.get("model.embed_tokens.weight"), "norm.weight": ckpt.get("model.norm.weight")}
    if not tied:
        state["lm_head.weight"] = ckpt.get("lm_head.weight")
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        state[dst + "input_layernorm.weight"] = ckpt.get(src + "input_layernorm.weight")
        state[dst + "post_attention_layernorm.weight"] = ckpt.get(src + "post_attention_layernorm.weight")
        for kind in ("weight", "bias"):
            qkv = [f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if qkv[0] in ckpt:
                state[f"{dst}self_attn.qkv_proj.{kind}"] = ckpt.cat(qkv)
            gate_up = [f"{src}mlp.{p}_proj.{kind}" for p in ("gate", "up")]
            if gate_up[0] in ckpt:
                state[f"{dst}mlp.gate_up_proj.{kind}"] = ckpt.cat(gate_up)
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                key = f"{src}{name}.{kind}"
                if key in ckpt:
                    state[f"{dst}{name}.{kind}"] = ckpt.get(key)
    return state


def load_config(model_dir: Path) -> PretrainedConfig:
    check_architecture(model_dir)
    return AutoConfig.from_pretrained(model_dir)


def load_model(
    model_dir: Path, dtype: torch.dtype, device: str = "cpu", panel_max_rows: int = 0, onednn_max_rows: int = 0,
    tensor_parallel: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """The model with its linears packed where that applies; `panel_max_rows` adds the
    bfloat16 panels that calls of up to that many rows read, `onednn_max_rows` the
    weights packed for oneDNN up to that many (engine/model/packed_linear.py).
    With `tensor_parallel`, this rank's shard (engine/parallel/tensor_parallel.py)."""
    config = load_config(model_dir)
    ckpt = _Checkpoint(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in ckpt
    config.tie_word_embeddings = tied
    qkv_bias = "model.layers.0.self_attn.q_proj.bias" in ckpt
    with torch.device("meta"):
        model = LlamaForCausalLM(config, qkv_bias=qkv_bias)
    state = {k: v.to(device=device, dtype=dtype) for k, v in _state_dict(config, ckpt, tied).items()}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # one tensor, not a copy
    model.load_state_dict(state, strict=True, assign=True)
    if tensor_parallel is not None and tensor_parallel.size > 1:
        shard_model(model, tensor_parallel)
    pack_linears(model, panel_max_rows, onednn_max_rows)
    return model.requires_grad_(False).eval()
