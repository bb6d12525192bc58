"""Sampler semantics on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from engine.messages import SamplingParams
from engine.sampler import apply_penalties, sample, token_logprobs, truncate
from engine.sequence import Sequence

pytestmark = pytest.mark.unit


def seq_with(output: list[int], **params) -> Sequence:
    seq = Sequence("r", [1, 2], SamplingParams(max_tokens=10, **params), 0.0)
    seq.token_ids.extend(output)
    return seq


def test_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 6)
    seq = seq_with([3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [seq])
    # Prompt tokens 1 and 2 are untouched; 3 seen twice, 4 once.
    assert logits[0].tolist() == [0.0, 0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0]


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, 12)
    seq = seq_with([3, 3, 9], repetition_penalty=1.3)  # prompt [1, 2], output [3, 3, 9]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits.clone())
    apply_penalties(logits, [seq])
    torch.testing.assert_close(logits, expected)


def test_greedy_takes_argmax_after_penalties():
    logits = torch.tensor([[0.0, 3.0, 2.5]])
    assert sample(logits.clone(), [seq_with([], temperature=0.0)]) == [1]
    assert sample(logits.clone(), [seq_with([1], temperature=0.0, presence_penalty=1.0)]) == [2]


def test_logit_bias_moves_greedy_and_random_rows_only_where_asked():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]] * 3)
    seqs = [seq_with([], temperature=0.0, logit_bias=((1, -100.0),)),
            seq_with([], temperature=1.0, logit_bias=((3, 100.0), (1, -100.0))),
            seq_with([], temperature=0.0)]
    assert sample(logits.clone(), seqs) == [2, 3, 1]
    # Among random draws, a +100 bias leaves the other tokens ~e^-97 of the mass.
    many = [seq_with([], logit_bias=((0, 100.0),)) for _ in range(64)]
    assert sample(torch.randn(64, 50), many) == [0] * 64


def test_top_k_top_p_min_p_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def kept(**params) -> list[bool]:
        return torch.isfinite(truncate(logits, [SamplingParams(max_tokens=1, **params)]))[0].tolist()

    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.25) == [True, True, True, False]  # 0.05 < 0.25 * 0.5
    assert kept(top_p=0.01) == [True, False, False, False]  # the top token always survives


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    seqs = [seq_with([], temperature=1.0) for _ in range(4000)]
    tokens = sample(torch.log(probs).expand(4000, 3).clone(), seqs)
    freq = torch.bincount(torch.tensor(tokens), minlength=3) / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_masked_tokens_are_never_drawn_and_the_rest_keep_their_odds():
    """Rows where a grammar left three tokens (the rest -inf), with and without top-p."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    allowed = torch.tensor([7, 3000, 4095])
    logits = torch.full((3000, 4096), float("-inf"))
    logits[:, allowed] = torch.log(probs)
    for top_p in (1.0, 0.999):
        seqs = [seq_with([], temperature=1.0, top_p=top_p) for _ in range(3000)]
        tokens = torch.tensor(sample(logits.clone(), seqs))
        assert torch.isin(tokens, allowed).all()
        freq = torch.stack([(tokens == t).float().mean() for t in allowed])
        assert torch.allclose(freq, probs, atol=0.03)


# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
_CHI2_999 = {2: 13.82, 5: 20.52}


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a token of probability zero was drawn"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def test_draws_pass_a_chi_square_test_at_each_setting():
    """20,000 draws per setting over a 6-token vocabulary, against the distribution the
    setting defines (temperature, then truncation), in one mixed batch."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    settings = {
        "plain": (dict(temperature=1.0), torch.softmax(logits, -1)),
        "hot": (dict(temperature=2.0), torch.softmax(logits / 2, -1)),
        "top_k=3": (dict(temperature=1.0, top_k=3), torch.softmax(logits[:3], -1)),
        "top_p=0.75": (dict(temperature=1.0, top_p=0.75), None),
    }
    base = torch.softmax(logits, -1)
    # top_p keeps the smallest prefix whose mass reaches 0.75: here the first three.
    assert base[:2].sum() < 0.75 <= base[:3].sum()
    settings["top_p=0.75"] = (settings["top_p=0.75"][0], base[:3] / base[:3].sum())
    n = 20_000
    seqs = [seq_with([], **params) for params, _ in settings.values() for _ in range(n)]
    seqs.insert(0, seq_with([], temperature=0.0))  # a greedy row in the same batch
    tokens = sample(logits.expand(len(seqs), 6).clone(), seqs)
    assert tokens[0] == 0
    for k, (name, (_, probs)) in enumerate(settings.items()):
        probs = torch.cat([probs, torch.zeros(6 - len(probs))])
        drawn = tokens[1 + k * n : 1 + (k + 1) * n]
        df = int((probs > 0).sum()) - 1
        assert _chi_square(drawn, probs) < _CHI2_999[df], name


def test_masked_tokens_are_never_drawn():
    # Mass concentrated on the last token: the CDF's flat run before it must not be hit.
    logits = torch.tensor([[float("-inf")] * 7 + [0.0]]).expand(500, 8).clone()
    logits[:250, 3] = 0.0
    tokens = sample(logits, [seq_with([], temperature=1.0) for _ in range(500)])
    assert set(tokens[250:]) == {7}
    assert set(tokens[:250]) == {3, 7}


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)
    alone = sample(logits.clone(), [seq_with([], temperature=1.0, seed=7)])[0]
    seeded = seq_with([], temperature=1.0, seed=7)
    crowd = [seq_with([], temperature=1.0) for _ in range(5)]
    batch = torch.cat([torch.randn(5, 50), logits])
    together = sample(batch, crowd + [seeded])[-1]
    assert alone == together
    # The same seed gives the same sequence of draws.
    a, b = seq_with([], temperature=1.0, seed=3), seq_with([], temperature=1.0, seed=3)
    draws_a = [sample(logits.clone(), [a])[0] for _ in range(10)]
    draws_b = [sample(logits.clone(), [b])[0] for _ in range(10)]
    assert draws_a == draws_b and len(set(draws_a)) > 1


def test_token_logprobs_reports_chosen_and_sorted_alternatives():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0]]), dim=-1)
    [(chosen, top)] = token_logprobs(logprobs, torch.tensor([0]), num_top=2)
    assert chosen == logprobs[0, 0].item()
    assert [t for t, _ in top] == [1, 2] and top[0][1] >= top[1][1]
