"""Guided decoding on a tiny random-weight model with a one-character-per-token
tokenizer: grammar masks touch only guided rows, every guided output follows its
grammar (random weights would wander anywhere else), and preemption, seeds, logprobs
and ignore_eos keep that true."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.grammar.bitmask import apply_bitmask, apply_bitmask_torch
from engine.grammar.compiler import GrammarCompiler
from engine.llm_engine import LLMEngine
from engine.messages import EngineRequest, SamplingParams, StructuredOutput
from engine.model.loader import load_model
from engine.runner import ModelRunner
from engine.sampler import mask_by_grammar
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.tiny_models import tiny_llama_config, write_char_tokenizer, write_tiny_model

pytestmark = pytest.mark.tiny

VOCAB = 97
EOS = 2
BS = 4

# Bounded, so that a model choosing at random among allowed tokens still finishes.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
            "required": ["zip"],
        },
    },
    "required": ["name", "age", "pet", "ok", "tags", "home"],
}
JSON = StructuredOutput("json", json.dumps(SCHEMA), any_whitespace=False)
REGEX_TEXT = r"[a-z]{2,5}-[0-9]{3}"
REGEX = StructuredOutput("regex", REGEX_TEXT)
CHOICES = ["red", "green", "blue"]
CHOICE = StructuredOutput("choice", json.dumps(CHOICES))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("guided")
    write_tiny_model(path, tiny_llama_config(vocab_size=VOCAB))
    write_char_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCompiler(lambda: tokenizer, VOCAB, [EOS])


def follows(spec: StructuredOutput, text: str) -> bool:
    if spec.kind == "json":
        try:
            jsonschema.validate(json.loads(text), json.loads(spec.spec))
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if spec.kind == "regex":
        return re.fullmatch(spec.spec, text) is not None
    return text in json.loads(spec.spec)


def prompt(seed: int, n: int = 9) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Run:
    def __init__(self, seqs: list[Sequence], num_preemptions: int, logprobs: dict[str, list]):
        self.seqs = {s.request_id: s for s in seqs}
        self.num_preemptions = num_preemptions
        self.logprobs = logprobs

    def tokens(self, request_id: str) -> list[int]:
        return self.seqs[request_id].output_token_ids


def serve(model_dir, grammars, requests: list[tuple[str, list[int], SamplingParams]], num_blocks=256,
          budget=64) -> Run:
    """Runs the requests (all arriving at once) to completion through scheduler and runner."""
    model = load_model(model_dir, torch.float32)
    runner = ModelRunner(model, num_blocks, BS, max_model_len=256, device="cpu")
    scheduler = Scheduler(BlockManager(num_blocks, BS, prefix_caching=False), budget, 16, 256, eos_token_ids=[EOS])
    seqs = []
    for request_id, prompt_ids, params in requests:
        seq = Sequence(request_id, prompt_ids, params, 0.0)
        if params.structured is not None:
            seq.grammar = grammars.matcher(params.structured)
        scheduler.add(seq)
        seqs.append(seq)
    logprobs: dict[str, list] = {}
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        for request_id, entry in result.logprobs.items():
            logprobs.setdefault(request_id, []).append(entry)
        scheduler.update(plan, result.sampled)
    return Run(seqs, scheduler.num_preemptions, logprobs)


def guided(spec: StructuredOutput, **params) -> SamplingParams:
    return SamplingParams(max_tokens=120, structured=spec, **params)


def check_follows(run: Run, tokenizer, request_id: str, spec: StructuredOutput) -> str:
    seq = run.seqs[request_id]
    assert seq.finish_reason == "stop", f"{request_id} ended by {seq.finish_reason}: {seq.output_token_ids}"
    tokens = seq.output_token_ids
    assert tokens[-1] == EOS and EOS not in tokens[:-1]
    text = tokenizer.decode(tokens[:-1])
    assert follows(spec, text), f"{request_id}: {text!r} does not follow {spec}"
    return text


@pytest.mark.parametrize("apply", [apply_bitmask, apply_bitmask_torch], ids=["cpu-numpy", "torch-ops"])
def test_apply_bitmask_bans_exactly_the_cleared_bits_of_the_given_rows(apply):
    vocab = 70  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)
    rows = [0, 2, 4]
    logits = torch.randn(5, vocab, generator=gen)
    expected = logits.clone()
    for i, row in enumerate(rows):
        for token in range(vocab):
            if not (int(bitmask[i, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    apply(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_masks_touch_only_guided_rows(grammars, tokenizer):
    seqs = [Sequence(f"s{i}", [5, 6], SamplingParams(max_tokens=4), 0.0) for i in range(4)]
    for i in (0, 2):
        seqs[i].grammar = grammars.matcher(CHOICE)
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    mask_by_grammar(logits, seqs)
    assert torch.equal(logits[[1, 3]], before[[1, 3]])
    first_letters = sorted(tokenizer.convert_tokens_to_ids([c[0] for c in CHOICES]))
    for i in (0, 2):
        kept = torch.isfinite(logits[i]).nonzero().flatten().tolist()
        assert kept == first_letters
        assert torch.equal(logits[i, kept], before[i, kept])


def test_unguided_rows_ignore_masks_and_guided_rows_follow_their_grammars(model_dir, grammars, tokenizer):
    plain = [("plain-greedy", prompt(1), SamplingParams(max_tokens=12, temperature=0.0)),
             ("plain-random", prompt(2), SamplingParams(max_tokens=12, seed=7))]
    specs = {"json": JSON, "regex": REGEX, "choice": CHOICE}
    mixed = plain + [
        (f"{name}-{mode}", prompt(10 + i), guided(spec, **options))
        for i, (name, spec) in enumerate(specs.items())
        for mode, options in (("greedy", {"temperature": 0.0}), ("random", {"seed": 3 + i, "temperature": 1.0}))
    ]
    together = serve(model_dir, grammars, mixed)
    alone = serve(model_dir, grammars, plain)
    for request_id, _, _ in plain:
        assert together.tokens(request_id) == alone.tokens(request_id)
    for name, spec in specs.items():
        for mode in ("greedy", "random"):
            check_follows(together, tokenizer, f"{name}-{mode}", spec)


def test_many_seeds_all_follow_the_schema(model_dir, grammars, tokenizer):
    requests = [(f"r{seed}", prompt(seed), guided(JSON, seed=seed, temperature=1.0)) for seed in range(12)]
    run = serve(model_dir, grammars, requests)
    texts = {check_follows(run, tokenizer, request_id, JSON) for request_id, _, _ in requests}
    assert len(texts) > 1, "different seeds should not all give the same document"


def test_the_same_seed_gives_the_same_output(model_dir, grammars):
    requests = [(name, prompt(4), guided(REGEX, seed=11, temperature=1.0)) for name in ("a", "b")]
    run = serve(model_dir, grammars, requests)
    assert run.tokens("a") == run.tokens("b")


def test_preemption_and_recompute_keep_the_grammar_state(model_dir, grammars, tokenizer):
    requests = [(f"r{i}", prompt(20 + i, n=14), guided(JSON, temperature=0.0)) for i in range(6)]
    roomy = serve(model_dir, grammars, requests)
    tight = serve(model_dir, grammars, requests, num_blocks=40, budget=32)
    assert tight.num_preemptions > 0, "the small cache must force preemptions"
    for request_id, _, _ in requests:
        check_follows(tight, tokenizer, request_id, JSON)
        assert tight.tokens(request_id) == roomy.tokens(request_id)


def test_logprobs_describe_the_masked_distribution(model_dir, grammars, tokenizer):
    run = serve(model_dir, grammars, [("c", prompt(5), guided(CHOICE, temperature=0.0, logprobs=5))])
    first, top = run.logprobs["c"][0]
    # Only the three first letters are possible: fewer alternatives than asked, their
    # probabilities summing to one, the chosen token among them.
    assert sorted(token for token, _ in top) == sorted(tokenizer.convert_tokens_to_ids([c[0] for c in CHOICES]))
    assert sum(torch.tensor([lp for _, lp in top]).exp()) == pytest.approx(1.0, abs=1e-5)
    assert first == max(lp for _, lp in top)


def test_a_complete_grammar_stops_even_with_ignore_eos(model_dir, grammars, tokenizer):
    run = serve(model_dir, grammars, [("c", prompt(6), guided(CHOICE, temperature=0.0, ignore_eos=True))])
    assert check_follows(run, tokenizer, "c", CHOICE) in CHOICES


def test_engine_compiles_each_spec_once_and_rejects_a_bad_one(model_dir, tokenizer):
    engine = LLMEngine(EngineConfig(model_dir=model_dir, dtype="float32", kv_cache_memory_gb=0.01,
                                    max_num_batched_tokens=64, max_num_seqs=8))
    bad = SamplingParams(max_tokens=8, structured=StructuredOutput("regex", "(unclosed"))
    rejected = engine.add_request(EngineRequest("bad", prompt(7), bad, time.time()))
    assert rejected.finish_reason == "error" and "structured output" in rejected.error
    for i in range(3):
        assert engine.add_request(EngineRequest(f"r{i}", prompt(8 + i), guided(REGEX, seed=i), time.time())) is None
    assert engine.grammars.num_compiled == 1
    outputs: dict[str, list[int]] = {}
    finish = {}
    while engine.has_work():
        for out in engine.step()[0]:
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            finish[out.request_id] = out.finish_reason
    for i in range(3):
        assert finish[f"r{i}"] == "stop"
        assert re.fullmatch(REGEX_TEXT, tokenizer.decode(outputs[f"r{i}"][:-1]))
