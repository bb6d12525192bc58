"""The token masks of one iteration's guided rows, filled in one batched call."""

from __future__ import annotations

import functools

import torch
import xgrammar as xgr

from engine.grammar.bitmask import allocate, apply_bitmask


@functools.cache
def _batch_filler(threads: int) -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher(max_threads=threads)


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> None:
    """In place: row rows[i] of logits [n, vocab] keeps only the tokens matchers[i]
    allows next (the others become -inf); other rows are untouched.

    The masks are filled on as many threads as torch computes with: the model is idle
    while the sampler runs, so the cores are free."""
    bitmask = allocate(len(rows), logits.shape[-1])  # [guided rows, words]
    _batch_filler(torch.get_num_threads()).batch_fill_next_token_bitmask(matchers, bitmask)
    apply_bitmask(logits, bitmask, rows)
