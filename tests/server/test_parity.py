"""Greedy decoding through the HTTP API equals transformers' `generate` on the real
default model (float32): same tokens, same text, logprobs within 1e-3."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    model_dir, _ = resolve_model(None, cache)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(client, model_name, http, reference, prompt):
    model, tokenizer = reference
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected = out.sequences[0, len(ids) :].tolist()
    expected_logprobs = [
        torch.log_softmax(logits[0].float(), dim=-1)[token].item() for logits, token in zip(out.logits, expected)
    ]

    got = client.completions.create(model=model_name, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
    choice = got.choices[0]
    assert got.usage.completion_tokens == len(expected)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(expected) == MAX_TOKENS and expected[-1] != 2 else "stop")
    for got_lp, want_lp in zip(choice.logprobs.token_logprobs, expected_logprobs):
        assert abs(got_lp - want_lp) < 1e-3
