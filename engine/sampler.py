"""Token sampling for one iteration's sequences, vectorised over the batch.

Order of operations (OpenAI semantics): a guided row's grammar mask first (tokens it
does not allow become -inf), then logit biases and penalties, then temperature, then
top-k / top-p / min-p truncation, then a draw. Greedy rows (temperature 0) take the
argmax after masks, biases and penalties. Reported logprobs are those of the model's
distribution after the grammar mask and before everything else, as vLLM reports them:
they describe the model within what the request allows, not the sampling settings.
Only guided rows are masked; the others are not read or written for it.

Every random row draws one uniform number per step and inverts its CDF, all rows
in one batched pass. A seeded request draws its number from its own generator, so
its tokens do not depend on what else shares the batch; unseeded rows share one
call. Greedy rows never draw; only rows that ask for top-k/top-p/min-p are sorted.
"""

from __future__ import annotations

import torch

from engine.grammar.masks import mask_rows
from engine.messages import SamplingParams, TokenLogprobs
from engine.sequence import Sequence


def mask_by_grammar(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: each guided row keeps only the tokens its grammar allows next. Called
    before logprobs are taken, so that they are those of the masked distribution."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if rows:
        mask_rows(logits, rows, [seqs[i].grammar for i in rows])


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. OpenAI's presence/frequency penalties count generated tokens only;
    vLLM's repetition penalty (as transformers' defines it) covers prompt and output:
    a seen token's logit is divided by it when positive, multiplied when negative."""
    vocab = logits.shape[-1]
    for i, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            picked = logits[i, seen]
            logits[i, seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    for i in rows:
        params = seqs[i].params
        output = torch.tensor(seqs[i].output_token_ids, dtype=torch.long)
        counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)  # [vocab]
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: each row's requested biases added to its token ids (OpenAI's logit_bias:
    -100 bans a token in practice, +100 all but forces it)."""
    for i, seq in enumerate(seqs):
        if seq.params.logit_bias:
            ids, biases = zip(*seq.params.logit_bias)
            logits[i].index_add_(0, torch.tensor(ids), torch.tensor(biases, dtype=logits.dtype))


# Logits this far below a row's maximum are raised to it before exp: float32 exp
# underflows below about -87, and torch's vectorized exp takes a slow path there, 10x
# slower over a row of -inf (a grammar's masked tokens: 3.5 ms instead of 0.35 for
# 32 x 49k). e^-80 of the top token's weight cannot move a float32 running sum that has
# reached a draw's target (at least 2^-24 of the total), so such tokens are still never
# drawn, and they fall below any top-p or min-p cut.
_EXP_FLOOR = -80.0


def _truncation_wanted(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0 or params.min_p > 0


def truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask out tokens that top-k, top-p or min-p exclude. logits: [n, vocab], already tempered.

    Only rows that ask for a truncation are sorted; the others pass through untouched
    (a full sort of the vocabulary is the costliest step of sampling)."""
    vocab = logits.shape[-1]
    rows = [i for i, p in enumerate(params) if _truncation_wanted(p, vocab)]
    if not rows:
        return logits
    asked = [params[i] for i in rows]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in asked]).unsqueeze(1)
    # top_p = 1 must keep everything, also the tail that float rounding pushes past 1.
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in asked], dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in asked], dtype=logits.dtype)
    sorted_logits, order = logits[rows].sort(dim=-1, descending=True)  # [t, vocab]
    drop = torch.arange(vocab).expand_as(sorted_logits) >= top_k
    probs = (sorted_logits - sorted_logits[:, :1]).clamp_(min=_EXP_FLOOR).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
    # before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    out = logits.clone()
    out[rows] = torch.empty_like(sorted_logits).scatter_(-1, order, sorted_logits)
    return out


def _uniforms(seqs: list[Sequence]) -> torch.Tensor:
    """One U[0, 1) per row, [n, 1]: unseeded rows from one shared call, each seeded row
    from its own generator (one number per step, so its draws do not depend on the batch)."""
    u = torch.rand(len(seqs), 1)
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            u[i] = torch.rand(1, generator=seq.generator)
    return u


# Rows sampled together: [8, vocab] float32 stays in a core's L2 cache (1.5 MB for a
# 49k vocabulary) through the four passes below, where [128, vocab] (25 MB) went to
# memory and back on every pass.
_ROWS_PER_CHUNK = 8


def _draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(logits), [n, vocab] -> [n], with u: [n, 1] in [0, 1).

    One uniform per row instead of noise over the whole vocabulary: exponential noise
    per token cost 1 ms per row per step on the 2-core Xeon (SmolLM2's 49k vocabulary),
    this costs a few percent of that. The CDF is left unnormalised and the target
    scaled by its total instead; the target (1 - u) * total lies in (0, total], so the
    first index whose CDF reaches it always has a non-zero probability (tokens masked
    to -inf weigh e^-80 of the top token, see _EXP_FLOOR: too little to move the CDF
    where the target lies, so they can never be the first to reach it)."""
    tokens = []
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        rows = logits[start : start + _ROWS_PER_CHUNK]
        cdf = (rows - rows.amax(dim=-1, keepdim=True)).clamp_(min=_EXP_FLOOR).exp_().cumsum_(dim=-1)  # [chunk, vocab]
        target = (1.0 - u[start : start + _ROWS_PER_CHUNK]) * cdf[:, -1:]  # [chunk, 1]
        tokens.append(torch.searchsorted(cdf, target).squeeze(1))
    return torch.cat(tokens).clamp_(max=logits.shape[-1] - 1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [n, vocab] float32, one row per sequence, guided rows already masked
    (mask_by_grammar; modified in place). Returns one token id per row."""
    apply_logit_bias(logits, seqs)
    apply_penalties(logits, seqs)
    tokens = [0] * len(seqs)
    greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy]
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if greedy_rows:
        picked = logits if len(greedy_rows) == len(seqs) else logits[greedy_rows]
        for i, token in zip(greedy_rows, picked.argmax(dim=-1).tolist()):
            tokens[i] = token
    if random_rows:
        params = [seqs[i].params for i in random_rows]
        rows = logits if len(random_rows) == len(seqs) else logits[random_rows]  # [r, vocab]
        if any(p.temperature != 1.0 for p in params):  # a pass over [r, vocab] saved in the common case
            rows.div_(torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1))
        tempered = truncate(rows, params)
        drawn = _draw(tempered, _uniforms([seqs[i] for i in random_rows]))
        for i, token in zip(random_rows, drawn.tolist()):
            tokens[i] = token
    return tokens


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """logprobs: [n, vocab]; chosen: [n] token ids. Per row: (chosen's logprob, top-`num_top` alternatives).

    Tokens a grammar ruled out (logprob -inf) are no alternatives: a guided row may list fewer."""
    picked = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        tops = [[(i, v) for i, v in zip(ids, vals) if v != float("-inf")]
                for ids, vals in zip(top_ids.tolist(), top_values.tolist())]
    else:
        tops = [[] for _ in picked]
    return list(zip(picked, tops))
