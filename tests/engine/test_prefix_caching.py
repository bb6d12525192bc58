"""Prefix caching end to end on a tiny model (float32, greedy): the same outputs with
the cache as without it, in every situation that reuses, evicts or must not share KV.

Requests arrive in waves; a wave runs to completion before the next arrives, so later
waves find what earlier ones left in the cache. Every test also checks that the cache
was used (or, where it must not be, that it was not), so none passes by never hitting.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.block_manager import BlockManager
from engine.lora.manager import LoRAManager
from engine.messages import SamplingParams
from engine.model.loader import load_model
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.teacher_forcing import run_teacher_forced
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model
from tests.peft_adapters import write_peft_adapter

pytestmark = pytest.mark.tiny

BS = 4
VOCAB = 97

# A wave: given the outputs so far (request id -> generated tokens), the requests that
# arrive next as (request id, prompt, adapter name or None, max_tokens).
Wave = Callable[[dict[str, list[int]]], list[tuple[str, list[int], str | None, int]]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    write_tiny_model(root / "base", tiny_llama_config())
    for seed, name in enumerate(("a", "b")):
        write_peft_adapter(root / "base", root / name, seed=seed, r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Served:
    def __init__(self, outputs, counters, hits_per_wave, num_preemptions, prompt_logprobs):
        self.outputs = outputs
        self.counters = counters
        self.hits_per_wave = hits_per_wave
        self.num_preemptions = num_preemptions
        self.prompt_logprobs = prompt_logprobs


def serve(root, waves: list[Wave], caching: bool, num_blocks=64, budget=16, max_seqs=8,
          prompt_logprobs: set[str] = frozenset()) -> Served:
    model = load_model(root / "base", torch.float32)
    loras = LoRAManager(model.lora_layout(), max_loras=2, max_cpu_loras=2, max_rank=8, dtype=torch.float32,
                        device="cpu")
    for name in ("a", "b"):
        loras.add(name, root / name)
    blocks = BlockManager(num_blocks, BS, prefix_caching=caching)
    runner = ModelRunner(model, num_blocks, BS, max_model_len=256, device="cpu", lora_backend=loras.backend)
    scheduler = Scheduler(blocks, budget, max_seqs, 256, eos_token_ids=[], adapter_slots=loras)
    outputs: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    hits_per_wave = []
    for wave in waves:
        hits_before = blocks.counters.hits
        seqs = []
        for request_id, prompt, adapter, max_tokens in wave(outputs):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                    prompt_logprobs=1 if request_id in prompt_logprobs else None)
            seq = Sequence(request_id, prompt, params, 0.0, loras.acquire(adapter) if adapter else None)
            scheduler.add(seq)
            seqs.append(seq)
        while scheduler.has_work():
            plan = scheduler.schedule()
            result = runner.execute(plan)
            for request_id, entries in result.prompt_logprobs.items():
                logprobs.setdefault(request_id, []).extend(entries)
            scheduler.update(plan, result.sampled)
        for seq in seqs:
            outputs[seq.request_id] = seq.output_token_ids
        hits_per_wave.append(blocks.counters.hits - hits_before)
    return Served(outputs, blocks.counters, hits_per_wave, scheduler.num_preemptions, logprobs)


def both(root, waves, **options) -> Served:
    """Serve with and without the cache; the outputs must be the same. Returns the cached run."""
    cached, uncached = serve(root, waves, True, **options), serve(root, waves, False, **options)
    assert cached.outputs == uncached.outputs
    assert cached.prompt_logprobs == uncached.prompt_logprobs
    assert uncached.counters.hits == 0
    return cached


def test_shared_system_prompt(tiny):
    system = tokens(1, 22)  # five full blocks, then two tokens sharing a block with the user's
    served = both(tiny, [
        lambda _: [("first", system + tokens(2, 5), None, 6)],
        lambda _: [(f"r{i}", system + tokens(10 + i, 3 + i), None, 6) for i in range(4)],
    ])
    # Five whole blocks, and the two system tokens of the sixth copied as a tail.
    assert served.hits_per_wave == [0, 4 * 22]


def test_multi_turn_history(tiny):
    turn1 = tokens(3, 18)

    def turn2(out):
        return [("t2", turn1 + out["t1"] + tokens(4, 7), None, 6)]

    def turn3(out):
        return [("t3", turn1 + out["t1"] + tokens(4, 7) + out["t2"] + tokens(5, 6), None, 6)]

    served = both(tiny, [lambda _: [("t1", turn1, None, 8)], turn2, turn3])
    # Turn 2 finds turn 1's prompt and the output tokens whose KV was computed (all but
    # the last): 18 + 7 = 25 tokens, 6 full blocks and the one token of turn 1's last,
    # partial block; turn 3 likewise all of turn 2's 33 + 5.
    assert served.hits_per_wave[1] == 25
    assert served.hits_per_wave[2] == 33 + 5


def test_adapters_never_share_and_each_reuses_its_own(tiny):
    prompt = tokens(6, 21)
    served = both(tiny, [
        lambda _: [("a1", prompt, "a", 5)],
        lambda _: [("b1", prompt, "b", 5), ("base1", prompt, None, 5)],
        lambda _: [("a2", prompt, "a", 5), ("b2", prompt, "b", 5), ("base2", prompt, None, 5)],
    ])
    assert served.outputs["a1"] != served.outputs["b1"], "the adapters must change the outputs"
    assert served.hits_per_wave == [0, 0, 3 * 20]


def test_prompt_on_a_block_boundary_recomputes_only_its_last_token(tiny):
    prompt = tokens(7, 16)
    served = both(tiny, [lambda _: [("x", prompt, None, 4)], lambda _: [("y", prompt, None, 4)]])
    assert served.hits_per_wave == [0, 15]  # three blocks, and three tokens of the fourth as a tail


def test_a_tail_whose_source_is_evicted_into_the_same_table(tiny):
    """A cache of four blocks, all cached and unreferenced: the next request's tail reads
    the least recently used one, which its own allocation then evicts as its target."""
    turn1 = tokens(14, 14)  # with 3 outputs: 16 computed tokens, four full blocks
    served = both(tiny, [
        lambda _: [("t1", turn1, None, 3)],
        lambda _: [("t2", turn1[:13] + tokens(15, 3), None, 1)],
    ], num_blocks=4)
    assert served.counters.evictions == 1
    assert served.hits_per_wave == [0, 13]


def test_eviction_under_a_tiny_cache(tiny):
    prompts = [tokens(20 + i, 14) for i in range(3)]
    waves = [lambda _, i=i: [(f"w{i}", prompts[i % 3], None, 3)] for i in range(6)]
    served = both(tiny, waves, num_blocks=9)
    assert served.counters.evictions > 0
    assert sum(served.hits_per_wave) > 0


def test_preemption_with_shared_blocks(tiny):
    shared = tokens(30, 12)
    served = both(tiny, [
        lambda _: [("seed", shared + tokens(31, 2), None, 2)],
        lambda _: [(f"p{i}", shared + tokens(40 + i, 3), None, 12) for i in range(4)],
    ], num_blocks=14)
    assert served.num_preemptions > 0
    assert served.hits_per_wave[1] == 4 * 12


def test_prompt_logprobs_are_computed_not_read_from_the_cache(tiny):
    prompt = tokens(8, 19)
    served = both(tiny, [lambda _: [("warm", prompt, None, 3)], lambda _: [("echo", prompt, None, 3)]],
                  prompt_logprobs={"echo"})
    assert served.hits_per_wave == [0, 0]
    assert len(served.prompt_logprobs["echo"]) == len(prompt) - 1


def teacher_forced_against_transformers(
    tmp_path, waves: list[list[Sequence] | Callable[[], list[Sequence]]]
) -> BlockManager:
    """Runs the waves of sequences one after the other (random teacher-forced outputs; a
    wave given as a function is built when its turn comes, from what earlier waves made)
    and compares every logits row computed in the last wave with transformers' on the
    whole final sequence; returns the block manager, for its counters."""
    reference = write_tiny_model(tmp_path, tiny_llama_config())
    model = load_model(tmp_path, torch.float32)
    blocks = BlockManager(64, BS, prefix_caching=True)
    runner = ModelRunner(model, 64, BS, max_model_len=256, device="cpu")
    scheduler = Scheduler(blocks, 16, 8, 256, eos_token_ids=[])
    gen = torch.Generator().manual_seed(2)
    for wave in waves:
        wave = wave() if callable(wave) else wave
        for seq in wave:
            scheduler.add(seq)
        computed, _ = run_teacher_forced(scheduler, runner, gen)
    with torch.no_grad():
        expected = {s.request_id: reference(torch.tensor([s.token_ids])).logits[0] for s in wave}
    for seq, position, ours in computed:
        torch.testing.assert_close(ours, expected[seq.request_id][position], atol=1e-4, rtol=0)
    return blocks


def greedy(request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), 0.0)


def test_logits_after_a_cached_prefix_match_transformers(tmp_path):
    """Every row computed on top of cached blocks against transformers on the full sequence."""
    shared = tokens(9, 17)
    seqs = [greedy(f"s{i}", shared + tokens(50 + i, 6), 4) for i in range(3)]
    blocks = teacher_forced_against_transformers(tmp_path, [[greedy("first", shared + [5], 3)], seqs])
    # Four whole blocks, and shared[16] as a tail (the block where "first" ended).
    assert blocks.counters.hits == 3 * 17


def test_logits_of_the_next_turn_after_a_copied_tail_match_transformers(tmp_path):
    """A chat client resends the history with its own copy of the reply: the block where
    the previous prompt ended holds the model's answer after it, so only the prompt's
    part of that block is shared, copied rather than recomputed."""
    turn1 = tokens(11, 18)  # four full blocks, then two tokens in the block the answer fills
    turn2 = greedy("t2", turn1 + tokens(12, 9) + tokens(13, 5), 4)
    blocks = teacher_forced_against_transformers(tmp_path, [[greedy("t1", turn1, 8)], [turn2]])
    assert blocks.counters.hits == 18


def test_logits_of_the_next_turn_after_the_model_s_own_reply_match_transformers(tmp_path):
    """A chat client resends the model's own reply: its last tokens sit in the finished
    turn's last, partial block, which the next turn copies from as a tail."""
    turn1 = greedy("t1", tokens(14, 18), 6)  # 18 + 5 computed: five full blocks, then three tokens

    def turn2() -> list[Sequence]:
        return [greedy("t2", turn1.token_ids + tokens(15, 5), 4)]

    blocks = teacher_forced_against_transformers(tmp_path, [[turn1], turn2])
    assert blocks.counters.hits == 18 + 5
