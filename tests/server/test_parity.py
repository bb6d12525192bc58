"""Greedy decoding through the HTTP API equals transformers' `generate` on the real
default model (float32): same tokens, same text, logprobs within 1e-3. And with small
calls reading bfloat16 panels, equals transformers with its linear weights rounded to
bfloat16. (bfloat16 compute is checked against a rounded reference at the logits, in
tests/engine/test_model_parity.py.)"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import httpx
import pytest
import torch

from engine.ops import bf16_linear_available

pytestmark = pytest.mark.server

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


def _check_greedy(client, model_name, ids, model, tokenizer):
    """The server's greedy completion of `ids` equals `model.generate`'s."""
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


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(client, model_name, http, reference, prompt):
    model, tokenizer = reference
    _check_greedy(client, model_name, http.post("/tokenize", json={"prompt": prompt}).json()["tokens"], model, tokenizer)


@pytest.mark.skipif(not bf16_linear_available(), reason="bf16_linear needs the C++ build on a CPU with AVX-512 or AVX2")
def test_float32_with_bfloat16_panels_equals_rounded_weights(tmp_path, reference):
    """float32 compute with every call of up to 16 rows reading bfloat16 panels (what
    `dtype: auto` picks on a CPU whose bf16 GEMMs are slow); prompts of at most 16 tokens
    make every batch that small, so every linear reads the rounded weights."""
    import openai

    from tests.engine.test_model_parity import _with_bf16_linear_weights
    from tests.server.conftest import start_server

    model, tokenizer = reference
    rounded = _with_bf16_linear_weights(copy.deepcopy(model))
    live = start_server(tmp_path, "--dtype", "float32", "--decode-weights", "bfloat16")
    try:
        assert "(bfloat16 panels up to 16 rows)" in live.log_path.read_text()
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        for prompt in PROMPTS:
            ids = httpx.post(f"{live.url}/tokenize", json={"prompt": prompt}).json()["tokens"]
            assert len(ids) <= 16, "a longer prompt would prefill with the float32 weights"
            _check_greedy(client, name, ids, rounded, tokenizer)
    finally:
        live.stop()


def test_default_dtype_is_the_measured_choice(tmp_path):
    """`dtype: auto` serves with what the CPU probe measured, and says so, with the KV cache's type."""
    from tests.server.conftest import start_server

    live = start_server(tmp_path, "--dtype", "auto")
    try:
        log = live.log_path.read_text()
        assert "CPU GEMM probe:" in log
        probed = log.split("CPU GEMM probe: ", 1)[1].split(",", 1)[0]
        assert probed in ("float32", "bfloat16")
        assert f"dtype={probed}" in log
        # The KV cache: bfloat16 under a bfloat16 model; under float32, as the decode kernel measured.
        kv = log.split(" tokens (", 1)[1].split(")", 1)[0]
        assert kv == "bfloat16" if probed == "bfloat16" else kv in ("float32", "bfloat16")
        assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        live.stop()
