"""Decode attention kernel time per layer, at the default model's head layout.

    .venv/bin/python bench/attention_kernel.py

Times `ops.paged_decode_attention` (csrc/cpu/paged_attention.cpp) for 8-128 sequences
of 192-256 cached tokens, 9 query heads over 3 KV heads of 64 (SmolLM2-135M), blocks
of 16 in random order, float32 and bfloat16; prints microseconds per layer and the
KV bytes read per second. Each timed pass goes through 30 layers' caches in turn, as
a decode step does: timed on one layer's cache alone, the KV stays in the last-level
cache (480 MiB on the 2-core Xeon) and the kernel looks 1.5x faster than it runs in
the engine. Writes nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import ops  # noqa: E402

LAYERS = 30  # SmolLM2-135M's


def main() -> None:
    if not ops.cpu_kernels_available():
        sys.exit("the CPU kernels did not build here")
    torch.manual_seed(0)
    block_size, kv_heads, head_dim, heads = 16, 3, 64, 9
    for dtype in (torch.float32, torch.bfloat16):
        for seqs, ctx in ((8, 192), (64, 192), (128, 192), (128, 256)):
            num_blocks = seqs * (ctx // block_size) + 1
            caches = [(torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype),
                       torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)) for _ in range(LAYERS)]
            tables = torch.randperm(num_blocks - 1)[: seqs * (ctx // block_size)].view(seqs, -1).contiguous()
            lens = torch.full((seqs,), ctx, dtype=torch.long)
            q = torch.randn(seqs, heads, head_dim).to(dtype)
            out = torch.empty_like(q)
            passes = []
            for _ in range(4):  # the first warms up: the thread pool, first touches of the caches
                started = time.perf_counter()
                for k_cache, v_cache in caches:
                    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, head_dim**-0.5)
                passes.append((time.perf_counter() - started) / LAYERS)
            seconds = min(passes[1:])
            kv_bytes = 2 * seqs * ctx * kv_heads * head_dim * k_cache.element_size()
            print(f"{str(dtype):>14} {seqs:>4} sequences x {ctx} tokens: {seconds * 1e6:7.0f} us/layer, "
                  f"{kv_bytes / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
