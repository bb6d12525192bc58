"""Deterministic benchmark prompts, identical for every backend.

Prompts are built as token ids (so lengths are exact) from a fixed pseudo-text:
words drawn from a small vocabulary with a seeded RNG. No data set download, and
the same seed gives the same prompts on any machine.
"""

from __future__ import annotations

import random

_WORDS = (
    "the model serves requests from many users while the scheduler batches decode steps "
    "and prefill chunks under a token budget so that latency stays low and throughput high "
    "memory blocks hold keys and values for each sequence a cache miss costs time "
    "river mountain city history science music garden engine ocean winter market story "
    "because although however therefore meanwhile quickly slowly carefully often never "
    "write explain describe compare summarize translate list imagine plan answer"
).split()


def _text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def make_prompts(tokenizer, num_prompts: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """`num_prompts` token-id lists with lengths uniform in [min_len, max_len]."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        length = rng.randint(min_len, max_len)
        # Words are >= 1 token each, so `length` words always yield enough tokens.
        ids = tokenizer.encode(_text(rng, length), add_special_tokens=False)
        prompts.append(ids[:length])
    return prompts
