"""Megatron-style tensor parallelism for the Llama-family model, applied at load time.

Every rank holds the whole model's structure and a shard of its weights, and all ranks
run the same iteration on the same tokens:

  qkv_proj, gate_up_proj   column-parallel: rank r computes its heads' q, k, v (its
                           share of the query and KV heads) and its share of the gate
                           and up columns, on the whole input; no communication;
  o_proj, down_proj        row-parallel: rank r multiplies its heads' (its columns')
                           part of the input by the matching rows of the weight and
                           gets a partial sum of the output; one all-reduce per block
                           makes it whole (`Attention.reduce`, `MLP.reduce`);
  embed_tokens             vocabulary-parallel: rank r holds rows [r V/N, (r+1) V/N) of
                           the table, looks up the tokens that fall there (zeros for
                           the rest), and an all-reduce assembles the rows;
  lm_head                  vocabulary-parallel: rank r computes the logits of its
                           vocabulary rows, an all-gather joins them.

Norms, rotary tables and the residual stream are replicated. The KV cache of a rank
holds only its KV heads, so N ranks cache N times the tokens a single one could. The
split needs the query heads, the KV heads and the intermediate size to divide by N; a
model where they do not is refused with a message that says which. The vocabulary is
padded to a multiple of N (padded rows give zero embeddings and logits that are cut off).

LoRA follows the weight it adapts: on a column-parallel projection A is replicated and
B split like the weight's output rows; on a row-parallel one A is split like the
weight's input columns and B replicated, so each rank's delta is a partial sum that
joins the base output's all-reduce (no collective of its own). Adapters are read whole
(checked against the whole model) and sharded as they are read (`shard_lora`).

Biases of row-parallel layers are added on rank 0 only, so the all-reduce adds them
once. The transform runs on the loaded float weights, before packing for the CPU
(engine/model/packed_linear.py), so each rank packs only its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.lora.adapter import LoRAWeights, load_adapter
from engine.lora.layout import LoRALayout, LoRATarget
from engine.model.llama import DOWN_PROJ, O_PROJ, LlamaForCausalLM

# The projections whose input is split (the others' output is).
ROW_PARALLEL = frozenset({O_PROJ, DOWN_PROJ})


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (torch.distributed, initialised).

    The collectives are differentiable where a finetuning backward recomputes through
    them (autograd on): every rank then holds the same replicated activations and the
    same loss, so the gradient of a replicated tensor is the same on all ranks, and that
    of a rank's partial sum is the gradient of the whole:
      all_reduce   forward: the sum of the partials; backward: the gradient, unchanged;
      enter        forward: unchanged (a replicated input entering a block whose ranks
                   use it differently); backward: the ranks' partial gradients summed;
      all_gather_columns  backward: this rank's columns of the gradient.
    """

    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # None: the default group

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, added in float32 whatever y's type: partial sums rounded to
        bfloat16 before they are added would round once per rank."""
        if y.requires_grad:
            return _SumOfPartials.apply(y, self)
        return self._sum(y)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """x itself; under autograd, its gradient is summed over the ranks."""
        return _SumOfGradients.apply(x, self) if x.requires_grad else x

    def all_gather_columns(self, y: torch.Tensor) -> torch.Tensor:
        """[n, c] on every rank -> [n, size * c], rank r's columns at [r c, (r+1) c)."""
        if y.requires_grad:
            return _GatherColumns.apply(y, self)
        return self._gather_columns(y)

    def _sum(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype != torch.float32:
            return self._sum(y.float()).to(y.dtype)
        dist.all_reduce(y, group=self.group)
        return y

    def _gather_columns(self, y: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class _SumOfPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, tp):
        return tp._sum(y.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOfGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp._sum(grad.clone()), None


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, tp):
        ctx.tp, ctx.columns = tp, y.shape[-1]
        return tp._gather_columns(y)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.tp.rank * ctx.columns
        return grad[..., start : start + ctx.columns].contiguous(), None


def check_divides(config, size: int) -> None:
    """Raise ValueError naming what does not divide by `size`."""
    counts = {
        "attention heads (num_attention_heads)": config.num_attention_heads,
        "KV heads (num_key_value_heads)": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    wrong = [f"{count} {what}" for what, count in counts.items() if count % size]
    if wrong:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide this model's {' and '.join(wrong)}: each rank must "
            f"hold a whole share of the heads and of the MLP; choose a size that divides them"
        )


def share(t: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's 1/size of `t` along `dim`, contiguous."""
    share = t.shape[dim] // tp.size
    return t.narrow(dim, tp.rank * share, share).contiguous()


def _rows(weight: torch.Tensor, parts: list[int], tp: TensorParallel) -> torch.Tensor:
    """Rank's share of each consecutive row block of `weight` (block sizes `parts`), concatenated."""
    return torch.cat([share(block, 0, tp) for block in weight.split(parts)])


def _shard_linear(linear: nn.Linear, parts: list[int] | None, tp: TensorParallel) -> None:
    """Column-parallel (`parts`: the output blocks, each split) or, with parts None,
    row-parallel (the input columns split; the bias kept on rank 0 only)."""
    if parts is not None:
        linear.weight = nn.Parameter(_rows(linear.weight, parts, tp), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(_rows(linear.bias, parts, tp), requires_grad=False)
        linear.out_features = linear.weight.shape[0]
        return
    linear.weight = nn.Parameter(share(linear.weight, 1, tp), requires_grad=False)
    if linear.bias is not None and tp.rank != 0:
        linear.bias = None
    linear.in_features = linear.weight.shape[1]


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table; see the module docstring."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TensorParallel):
        super().__init__()
        self.weight = weight  # [rows, hidden], zero-padded past the vocabulary
        self.start = start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden]
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = self.weight[local.masked_fill(outside, 0)]
        rows[outside] = 0
        return self.tp.all_reduce(rows)


class VocabParallelHead(nn.Module):
    """The LM head over this rank's vocabulary rows, gathered into whole logits."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallel):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.linear.weight = nn.Parameter(weight, requires_grad=False)  # [rows, hidden]
        self.vocab_size = vocab_size
        self.tp = tp

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        return self.tp.all_gather_columns(self.linear(self.tp.enter(hidden)))[:, : self.vocab_size]


def shard_model(model: LlamaForCausalLM, tp: TensorParallel) -> None:
    """Keep this rank's shard of every weight, in place (before packing)."""
    config = model.config
    check_divides(config, tp.size)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _shard_linear(attn.qkv_proj, [attn.q_size, attn.kv_size, attn.kv_size], tp)
        _shard_linear(attn.o_proj, None, tp)
        attn.num_heads //= tp.size
        attn.num_kv_heads //= tp.size
        attn.q_size, attn.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        attn.enter, attn.reduce = tp.enter, tp.all_reduce
        _shard_linear(mlp.gate_up_proj, [mlp.intermediate, mlp.intermediate], tp)
        _shard_linear(mlp.down_proj, None, tp)
        mlp.intermediate //= tp.size
        mlp.enter, mlp.reduce = tp.enter, tp.all_reduce

    vocab = config.vocab_size
    rows = -(-vocab // tp.size)
    start = tp.rank * rows

    def vocab_rows(table: torch.Tensor) -> torch.Tensor:  # [vocab, hidden] -> [rows, hidden]
        shard = table.new_zeros(rows, table.shape[1])
        own = table[start : start + rows]
        shard[: own.shape[0]] = own
        return shard

    tied = model.lm_head.weight is model.embed_tokens.weight
    embedding = vocab_rows(model.embed_tokens.weight)
    model.embed_tokens = VocabParallelEmbedding(embedding, start, tp)
    model.lm_head = VocabParallelHead(embedding if tied else vocab_rows(model.lm_head.weight), vocab, tp)


def shard_layout(layout: LoRALayout, size: int) -> LoRALayout:
    """The LoRA layout of one rank's shard of the model."""
    def shard(target: LoRATarget) -> LoRATarget:
        if target.name in ROW_PARALLEL:
            return LoRATarget(target.name, target.group, target.in_features // size, target.parts)
        return LoRATarget(target.name, target.group, target.in_features,
                          tuple((name, out // size) for name, out in target.parts))

    return LoRALayout(layout.num_layers, tuple(shard(t) for t in layout.targets))


def read_lora_shard(path: Path, layout: LoRALayout, max_rank: int, dtype: torch.dtype,
                    tp: TensorParallel) -> LoRAWeights:
    """This rank's part of the adapter at `path`, checked whole against the whole model's `layout`."""
    return shard_lora(load_adapter(path, layout, max_rank, dtype), layout, tp)


def shard_lora(weights: LoRAWeights, layout: LoRALayout, tp: TensorParallel) -> LoRAWeights:
    """This rank's part of an adapter read whole against the whole model's `layout`:
    B's rows of a column-parallel projection, A's columns of a row-parallel one."""
    modules = {}
    for (layer, module), (a, b) in weights.modules.items():
        target, _ = layout.locate(module)
        if target.name in ROW_PARALLEL:
            a = share(a, 1, tp)
        else:
            b = share(b, 0, tp)
        modules[(layer, module)] = (a, b)
    return LoRAWeights(path=weights.path, rank=weights.rank, modules=modules)
