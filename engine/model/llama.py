"""Llama-family decoder (Llama 2/3, SmolLM, Qwen2, Mistral) on a flat token batch.

Input is one iteration's tokens, `[num_tokens]`, from many sequences at once;
`AttentionMetadata` says which token belongs where in the paged cache. q/k/v and
gate/up are fused into one matmul each: fewer, larger matmuls are what a CPU (and
a GPU at small batch) runs fastest. With `lora` set, each of those four projections
adds the LoRA deltas of the tokens' adapters to its output (engine/lora/backend.py).

The same layer code runs the finetuning backward's recompute (engine/finetune/
recompute.py): one training sequence, no KV cache (`kv_cache` and `meta` None: causal
attention over the sequence), autograd on, the job's trainable LoRA as `lora`. Fused
kernels and pre-packed GEMMs have no gradients, so with autograd on each module takes
its native, differentiable path.

Tensor parallelism is applied at load time (engine/parallel/tensor_parallel.py): it
shards the weights and sets `reduce` on the attention and MLP blocks, whose o_proj and
down_proj then produce partial sums (LoRA deltas included) that `reduce` all-reduces,
and `enter`, which sums the blocks' input gradients over the ranks in a finetuning
backward. This file only leaves those hooks; on one device they return their input.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from engine import ops
from engine.attention import AttentionMetadata, causal_attention, paged_attention
from engine.lora.layout import LoRALayout, LoRATarget
from engine.model.rope import apply_rope

# The fused projections LoRA attaches to (this model's linears of those names).
QKV_PROJ, O_PROJ, GATE_UP_PROJ, DOWN_PROJ = "qkv_proj", "o_proj", "gate_up_proj", "down_proj"


def whole(y: torch.Tensor) -> torch.Tensor:
    """A block's output on one device: already the whole sum."""
    return y


class LayerLoRA(Protocol):
    """LoRA deltas for the projections of a forward: the serving batch's adapters
    (engine/lora/backend.py LoRAContext) or a job's trainable adapter
    (engine/finetune/lora_params.py TrainableLoRA)."""

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        """out [num_tokens, out_features] (the base projection of x [num_tokens, in])
        plus the deltas, in out's dtype; may update out in place and return it."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.eps = eps
        # add_forward through the csrc kernel (on the CPU); set by the runner.
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32, like the reference, so bf16 serving stays close to it.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(self.weight.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta), both [num_tokens, hidden]; delta None adds nothing.
        x is the float32 residual stream; delta and the result are in the compute type.
        The fused path updates x in place: callers pass a residual stream they own."""
        fusable = delta is None or delta.dtype == self.weight.dtype
        if self.fused and fusable and x.dtype == torch.float32 and x.is_contiguous() and not torch.is_grad_enabled():
            return ops.add_rms_norm(x, delta, self.weight, self.eps), x
        if delta is not None:
            x = x + delta
        return self(x), x


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.scale = head_dim**-0.5
        # Rotation and cache write through the csrc kernel (on the CPU); set by the runner.
        self.fused = False
        # Tensor parallelism: `reduce` all-reduces the partial outputs; `enter` sums the
        # input's gradient over the ranks in a finetuning backward.
        self.enter = self.reduce = whole

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # None: one whole sequence, nothing cached
        meta: AttentionMetadata | None,
        lora: LayerLoRA | None,
    ) -> torch.Tensor:
        x = self.enter(x)
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        if lora is not None:
            qkv = lora.apply(qkv, x, self.layer, QKV_PROJ)
        fused = (
            self.fused and kv_cache is not None and qkv.dtype == cos.dtype and qkv.is_contiguous()
            and kv_cache[0].dtype in (qkv.dtype, torch.bfloat16)  # a bfloat16 cache under float32 too
        )
        if fused:  # rotated in place and cached in one pass
            ops.rope_write_kv(qkv, cos, sin, *kv_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        heads = qkv.view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if not fused:  # q and k rotated together: one set of elementwise ops instead of two
            q, k = apply_rope(heads[:, : self.num_heads + self.num_kv_heads], cos, sin).split(
                [self.num_heads, self.num_kv_heads], dim=1
            )
        if kv_cache is None:
            out = causal_attention(q, k, v, self.scale).reshape(-1, self.q_size)
        else:
            out = paged_attention(q, k, v, *kv_cache, meta, self.scale, kv_written=fused).view(-1, self.q_size)
        y = self.o_proj(out)
        if lora is not None:
            y = lora.apply(y, out, self.layer, O_PROJ)
        return self.reduce(y)


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int):
        super().__init__()
        self.layer = layer
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SwiGLU with silu only)")
        bias = getattr(config, "mlp_bias", False)
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=bias)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=bias)
        # silu(gate) * up through the csrc kernel (on the CPU); set by the runner.
        self.fused = False
        self.enter = self.reduce = whole  # tensor parallelism, as in Attention

    def forward(self, x: torch.Tensor, lora: LayerLoRA | None) -> torch.Tensor:
        x = self.enter(x)
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if lora is not None:
            gate_up = lora.apply(gate_up, x, self.layer, GATE_UP_PROJ)
        if self.fused and gate_up.is_contiguous() and not torch.is_grad_enabled():
            act = ops.silu_and_mul(gate_up)  # [num_tokens, intermediate]
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
        y = self.down_proj(act)
        if lora is not None:
            y = lora.apply(y, act, self.layer, DOWN_PROJ)
        return self.reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, head_dim, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x, delta, cos, sin, kv_cache, meta, lora):
        """The layer's input is x + delta (delta: the previous layer's last residual add,
        None before the first layer). Returns its output the same way, unsummed: the
        next norm does that add in the same pass."""
        h, x = self.input_layernorm.add_forward(x, delta)
        h, x = self.post_attention_layernorm.add_forward(x, self.self_attn(h, cos, sin, kv_cache, meta, lora))
        return x, self.mlp(h, lora)


def _rows_of_sum(x: torch.Tensor, delta: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """(x + delta)[rows], [len(rows), hidden], computing the sum at those rows only."""
    picked = x.index_select(0, rows)
    return picked if delta is None else picked + delta.index_select(0, rows)


def head_dim_of(config: PretrainedConfig) -> int:
    """Per-head width: the config's `head_dim` where it sets one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaForCausalLM(nn.Module):
    # qkv_bias: Qwen2 has biases on q/k/v but not on o; the loader reads it off the checkpoint.
    def __init__(self, config: PretrainedConfig, qkv_bias: bool = False):
        super().__init__()
        self.config = config
        self.head_dim = head_dim_of(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.head_dim, qkv_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # With tied embeddings the loader hands lm_head the embedding tensor itself.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        cos: torch.Tensor,  # [num_tokens, head_dim], rope tables gathered at the tokens' positions
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LayerLoRA | None = None,
        capture_rows: torch.Tensor | None = None,  # [n] rows whose layer inputs to keep
        captured: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """With `capture_rows`, appends to `captured` each layer's input at those rows and
        the last layer's output, [n, hidden] each: what a finetuning backward recomputes from."""
        # The residual stream is x + delta, x in float32 whatever the compute type: a
        # bfloat16 stream would round away the small updates of each layer.
        x, delta = self.embed_tokens(input_ids).float(), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            if capture_rows is not None:
                captured.append(_rows_of_sum(x, delta, capture_rows))
            x, delta = layer(x, delta, cos, sin, kv_cache, meta, lora)
        if capture_rows is not None:
            captured.append(_rows_of_sum(x, delta, capture_rows))
        return self.norm.add_forward(x, delta)[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads this model computes and caches (this rank's, under tensor parallelism)."""
        return self.layers[0].self_attn.num_kv_heads

    @property
    def num_heads(self) -> int:
        return self.layers[0].self_attn.num_heads

    def lora_layout(self) -> LoRALayout:
        """Where LoRA adapters attach: each fused projection with the PEFT (Hugging Face)
        projections it is made of, in output-column order. The whole model's, as adapters
        are made for it (tensor parallelism shards it: engine/parallel/tensor_parallel.py)."""
        config = self.config
        hidden, inter = config.hidden_size, config.intermediate_size
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        return LoRALayout(
            num_layers=config.num_hidden_layers,
            targets=(
                LoRATarget(QKV_PROJ, "self_attn", hidden, (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size))),
                LoRATarget(O_PROJ, "self_attn", q_size, (("o_proj", hidden),)),
                LoRATarget(GATE_UP_PROJ, "mlp", hidden, (("gate_proj", inter), ("up_proj", inter))),
                LoRATarget(DOWN_PROJ, "mlp", inter, (("down_proj", hidden),)),
            ),
        )

    def set_fused_kernels(self, enabled: bool) -> None:
        """Residual adds and norms, rotary embeddings and cache writes, SwiGLU activations
        through the csrc kernels (engine/ops.py), or natively."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = enabled

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        return self.lm_head(hidden).float()
