"""Token bitmasks: one bit per vocabulary id, packed 32 to an int32, bit j of word w
allowing token 32 * w + j (the layout xgrammar, llguidance and vLLM share)."""

from __future__ import annotations

import numpy as np
import torch

# Bit j of each word, in the order tokens are numbered.
_BITS = 1 << torch.arange(32, dtype=torch.int32)


def allocate(rows: int, vocab: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every token allowed."""
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab] bool."""
    bits = (bitmask.unsqueeze(-1) & _BITS.to(bitmask.device)) != 0  # [rows, words, 32]
    return bits.flatten(1)[:, :vocab]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: in row rows[i] of logits [n, vocab], the tokens row i of bitmask
    [len(rows), words] disallows become -inf. Other rows are not read or written.

    On the CPU through numpy, one row at a time: torch's masked_fill over the unpacked
    bits took 1.3 ms for 32 rows of a 49k vocabulary on one core of the 2-core Xeon and
    10-15 ms on two when another process wanted the cores, numpy's single-threaded
    copyto 0.8 ms either way (bench/bench_grammar.py times both)."""
    if logits.is_cpu:
        _apply_numpy(logits, bitmask, rows)
    else:
        apply_bitmask_torch(logits, bitmask, rows)


def _apply_numpy(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    vocab = logits.shape[-1]
    # Little-endian int32 words read as bytes, least significant bit first, give the
    # bits in token order.
    banned = np.unpackbits((~bitmask.numpy()).view(np.uint8), axis=1, bitorder="little").view(bool)
    out = logits.numpy()
    for i, row in enumerate(rows):
        np.copyto(out[row], -np.inf, where=banned[i, :vocab])


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """apply_bitmask in torch ops on the logits' device (a GPU's; the bitmask is moved there)."""
    banned = ~allowed(bitmask.to(logits.device), logits.shape[-1])  # [len(rows), vocab]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill_(banned, float("-inf"))
