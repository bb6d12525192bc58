"""Attention over the paged KV cache for one flat token batch (native PyTorch).

The batch is laid out as the plan orders it: first `num_decode_tokens` sequences
with one query token each, then prefill chunks. Decodes are attended together in
one call (the CPU kernel of engine/ops.py reading the cache in place, else one
batched SDPA over gathered blocks); each prefill chunk is attended on its own,
causally, against everything its sequence has in the cache.

This native path is the reference that kernel-backed paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import ops


@dataclass
class PrefillSpan:
    token_start: int  # offset of the chunk in the flat batch
    num_tokens: int  # query tokens in the chunk
    num_computed: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [num_blocks_of_seq] long
    # [num_tokens, num_computed + num_tokens] additive mask (0 or -inf, the compute
    # type), None when the chunk starts the sequence (plain causal attention).
    mask: torch.Tensor | None

    @property
    def context_len(self) -> int:
        return self.num_computed + self.num_tokens


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long (0-padded)
    decode_context_lens: torch.Tensor  # [num_decodes] long
    # [num_decodes, 1, 1, max_blocks * block_size] bool for the native path; None
    # when the decode kernel (engine/ops.py) reads the cache in place.
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSpan]
    # Prefill chunks run the AMX kernel over the cache (engine/ops.py prefill_attention;
    # spans then carry no mask), else SDPA.
    prefill_kernel: bool = False


def chunk_mask(num_tokens: int, start: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """[num_tokens, start + num_tokens] additive mask of a chunk after `start` cached
    tokens: query i (position start + i) sees keys 0..start + i, -inf above that diagonal.
    Additive in the compute type: SDPA converts a boolean mask in every layer (8% of a
    prefix-cached prefill iteration)."""
    return torch.full((num_tokens, start + num_tokens), float("-inf"), dtype=dtype, device=device).triu_(start + 1)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim]
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,  # k and v are in the cache already (ops.rope_write_kv)
) -> torch.Tensor:  # [num_tokens, heads, head_dim]
    if not kv_written:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    kv_heads, head_dim = k.shape[1:]
    num_decodes = meta.num_decode_tokens
    attended_decodes = None
    if num_decodes:
        if meta.decode_mask is None:
            attended_decodes = torch.empty(num_decodes, q.shape[1], head_dim, dtype=q.dtype, device=q.device)
            ops.paged_decode_attention(
                attended_decodes, q[:num_decodes], k_cache, v_cache, meta.decode_block_tables,
                meta.decode_context_lens, scale,
            )
        else:
            attended_decodes = _gathered_decode_attention(q[:num_decodes], k_cache, v_cache, meta, scale)
        if not meta.prefills:
            return attended_decodes  # a decode-only step needs no second output buffer
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if attended_decodes is not None:
        out[:num_decodes] = attended_decodes
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        if meta.prefill_kernel:
            ops.prefill_attention(out[rows], q[rows], k_cache, v_cache, span.block_table, span.num_computed, scale)
            continue
        if span.num_computed == 0:
            # A fresh chunk: its keys and values as the cache holds them, without reading it back.
            keys, values = k[rows].to(k_cache.dtype), v[rows].to(v_cache.dtype)
        else:
            keys = k_cache.index_select(0, span.block_table).view(-1, kv_heads, head_dim)[: span.context_len]
            values = v_cache.index_select(0, span.block_table).view(-1, kv_heads, head_dim)[: span.context_len]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a bfloat16 cache under a float32 model
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),  # [1, heads, chunk, head_dim]
            keys.transpose(0, 1).unsqueeze(0),  # [1, kv_heads, ctx, head_dim]
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended[0].transpose(0, 1)
    return out


def causal_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim], positions 0..num_tokens-1 of one sequence
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [num_tokens, heads, head_dim]
    """Causal attention of one whole sequence that nothing cached: the finetuning
    backward's recompute (differentiable). Computed in float32: SDPA's CPU backward in
    bfloat16 took twice float32's time (2026-12-06, 2-core Xeon with AMX, 160 tokens of
    SmolLM2-135M: 2.8 against 1.4 ms a layer)."""
    # As [1, heads, T, head_dim]: with a batch dimension SDPA takes its fused CPU kernel
    # (forward and backward); without one, the unfused math path.
    attended = F.scaled_dot_product_attention(
        *(t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v)), is_causal=True, scale=scale, enable_gqa=True
    )  # [1, heads, T, head_dim]
    return attended[0].transpose(0, 1).to(q.dtype)


def _gathered_decode_attention(
    q: torch.Tensor,  # [num_decodes, heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_decodes, heads, head_dim]
    """Native decode attention: copy each sequence's blocks out, then one batched SDPA."""
    num_decodes = q.shape[0]
    kv_heads, head_dim = k_cache.shape[2:]
    # index_select on the flat table is several times faster on CPU than advanced indexing.
    # [num_decodes * max_blocks, block_size, kv_heads, head_dim] -> [num_decodes, kv_heads, ctx, head_dim]
    table = meta.decode_block_tables.view(-1)
    keys = k_cache.index_select(0, table).view(num_decodes, -1, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    values = v_cache.index_select(0, table).view(num_decodes, -1, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    attended = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
    )  # [num_decodes, heads, 1, head_dim]
    return attended.squeeze(2)


def bfloat16_cache_is_no_slower(heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Times the CPU decode kernel with float32 queries over a float32 cache and over a
    bfloat16 one, side by side: 64 sequences of 192 cached tokens, four layers' caches in
    turn so that the KV comes from memory as in a decode step (~0.1 s). True if the
    bfloat16 cache took no longer (median ratio of neighbouring calls)."""
    from engine.model.gemm_probe import side_by_side_ms

    seqs, tokens, layers = 64, 192, 4
    blocks_per_seq = -(-tokens // block_size)
    shape = (seqs * blocks_per_seq, block_size, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(0)  # the global generator is the requests'
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    # Scattered blocks, as a cache holds them.
    tables = torch.randperm(shape[0], generator=gen).view(seqs, blocks_per_seq)
    lens = torch.full((seqs,), tokens, dtype=torch.long)
    out = torch.empty_like(q)

    def step(dtype: torch.dtype):
        caches = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
                  for _ in range(layers)]

        def run() -> None:
            for k_cache, v_cache in caches:
                ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, head_dim**-0.5)

        return run

    _, _, ratio = side_by_side_ms(step(torch.bfloat16), step(torch.float32))
    return ratio <= 1.0


def prefill_kernel_is_faster(heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Times the AMX prefill kernel against SDPA on this CPU, for one 128-token chunk over
    1,024 cached tokens (the prefix-cache case, where attention is most of the iteration)
    and one fresh 128-token chunk; True if the kernel took less time (~20 ms)."""
    import time

    queries, cached = 128, 1024
    context = cached + queries
    blocks = -(-context // block_size)
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(blocks)
    q = torch.randn(queries, heads, head_dim, dtype=torch.bfloat16)
    kv = q[:, :kv_heads]  # unused: the chunk's keys and values count as written
    spans = [PrefillSpan(0, queries, cached, table, chunk_mask(queries, cached, torch.bfloat16)), PrefillSpan(0, queries, 0, table, None)]
    no_tables, no_lens = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)

    def seconds(kernel: bool) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for span in spans:
                meta = AttentionMetadata(no_lens, 0, no_tables, no_lens, None, [span], kernel)
                paged_attention(q, kv, kv, k_cache, v_cache, meta, head_dim**-0.5, kv_written=True)
            best = min(best, time.perf_counter() - started)
        return best

    return seconds(True) < seconds(False)
