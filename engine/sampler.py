"""Token sampling for one iteration's sequences, vectorised over the batch.

Order of operations (OpenAI semantics): penalties on the raw logits, then
temperature, then top-k / top-p / min-p truncation, then a draw. Greedy rows
(temperature 0) take the argmax after penalties. Reported logprobs are those of
the raw model distribution, before any of this, so they describe the model and
not the sampling settings.

A seeded request draws from its own generator, one row at a time, so its tokens
do not depend on what else shares the batch; unseeded rows share one draw.
"""

from __future__ import annotations

import torch

from engine.messages import SamplingParams, TokenLogprobs
from engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. OpenAI's presence/frequency penalties count generated tokens only."""
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if not rows:
        return
    vocab = logits.shape[-1]
    for i in rows:
        params = seqs[i].params
        output = torch.tensor(seqs[i].output_token_ids, dtype=torch.long)
        counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)  # [vocab]
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask out tokens that top-k, top-p or min-p exclude. logits: [n, vocab], already tempered."""
    top_k = [p.top_k if p.top_k > 0 else logits.shape[-1] for p in params]
    # top_p = 1 must keep everything, also the tail that float rounding pushes past 1.
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    min_p = [p.min_p for p in params]
    if all(k == logits.shape[-1] for k in top_k) and all(p == float("inf") for p in top_p) and not any(min_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab]
    ranks = torch.arange(logits.shape[-1]).expand_as(sorted_logits)
    drop = ranks >= torch.tensor(top_k).unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
    # before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, dtype=probs.dtype).unsqueeze(1)
    drop |= probs < torch.tensor(min_p, dtype=probs.dtype).unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # argmax(p / Exp(1)) samples from p, and with one generator call per row.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [n, vocab] float32, one row per sequence. Returns one token id per row."""
    apply_penalties(logits, seqs)
    tokens = logits.argmax(dim=-1)  # [n]
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        params = [seqs[i].params for i in random_rows]
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
        probs = truncate(logits[random_rows] / temps, params).softmax(dim=-1)  # [r, vocab]
        unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
        if unseeded:
            drawn = _draw(probs[unseeded], None)
            for j, token in zip(unseeded, drawn.tolist()):
                tokens[random_rows[j]] = token
        for j, i in enumerate(random_rows):
            if seqs[i].generator is not None:
                tokens[i] = _draw(probs[j : j + 1], seqs[i].generator)[0]
    return tokens.tolist()


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """logprobs: [n, vocab]; chosen: [n] token ids. Per row: (chosen's logprob, top-`num_top` alternatives)."""
    picked = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        tops = [list(zip(ids, vals)) for ids, vals in zip(top_ids.tolist(), top_values.tolist())]
    else:
        tops = [[] for _ in picked]
    return list(zip(picked, tops))
