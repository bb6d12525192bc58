"""/v1/completions through the real openai client against a live server."""

from __future__ import annotations

import math

import pytest

from tests.server.conftest import assert_openai_error

pytestmark = pytest.mark.server

PROMPT = "The capital of France is"
REPETITIVE = "one two one two one two one two"


def complete(client, model, **kw):
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, **kw)


def stream_text(client, model, **kw) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(complete(client, model, stream=True, **kw))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def test_greedy_stream_equals_non_stream(client, model_name):
    full = complete(client, model_name, max_tokens=8)
    texts, finish, _ = stream_text(client, model_name, max_tokens=8)
    assert texts[0] == full.choices[0].text
    assert finish[0] == full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8


def test_prompt_shapes_and_usage(client, model_name, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    for prompt in (PROMPT, [PROMPT], ids, [ids]):
        out = complete(client, model_name, prompt=prompt, max_tokens=4)
        assert out.usage.prompt_tokens == len(ids)
        assert out.usage.completion_tokens == 4
        assert out.usage.total_tokens == len(ids) + 4
    two = complete(client, model_name, prompt=[PROMPT, "Hello"], max_tokens=3, n=2)
    hello = http.post("/tokenize", json={"prompt": "Hello"}).json()["count"]
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == len(ids) + hello  # once per prompt, not per choice
    assert two.usage.completion_tokens == 12
    # Choices of the same prompt under greedy decoding agree.
    assert two.choices[0].text == two.choices[1].text
    assert complete(client, model_name, prompt=ids, max_tokens=4).choices[0].text == complete(
        client, model_name, max_tokens=4
    ).choices[0].text


def test_seed_reproducible_and_n_differs(client, model_name):
    kw = dict(temperature=1.0, max_tokens=8, seed=1234, n=2)
    a, b = complete(client, model_name, **kw), complete(client, model_name, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    # Choice i uses seed + i: choice 1 of seed s equals choice 0 of seed s + 1.
    shifted = complete(client, model_name, temperature=1.0, max_tokens=8, seed=1235)
    assert shifted.choices[0].text == a.choices[1].text


def test_sampling_extras_accepted(client, model_name):
    out = complete(client, model_name, temperature=0.8, top_p=0.9, seed=1, extra_body={"top_k": 5, "min_p": 0.05})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_stop_string_excluded_and_spanning_tokens(client, model_name):
    full = complete(client, model_name, max_tokens=8).choices[0].text
    assert full.startswith(" Paris.")
    # " Paris" and "." are separate tokens, so "is." straddles their boundary.
    for stop, expected in (("ris.", " Pa"), (["zzz", "is."], " Par")):
        out = complete(client, model_name, max_tokens=8, stop=stop)
        assert out.choices[0].text == expected
        assert out.choices[0].finish_reason == "stop"
        texts, finish, _ = stream_text(client, model_name, max_tokens=8, stop=stop)
        assert texts[0] == expected and finish[0] == "stop"


def test_stop_token_ids(client, model_name, http):
    full = complete(client, model_name, max_tokens=8).choices[0].text
    second = http.post("/tokenize", json={"prompt": full}).json()["tokens"][1]
    out = complete(client, model_name, max_tokens=8, extra_body={"stop_token_ids": [second]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 2


def test_penalties_change_repetitive_output(client, model_name):
    plain = complete(client, model_name, prompt=REPETITIVE, max_tokens=10).choices[0].text
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = complete(client, model_name, prompt=REPETITIVE, max_tokens=10, **penalty).choices[0].text
        assert penalized != plain, penalty


def test_ignore_eos_generates_max_tokens(client, model_name):
    out = complete(client, model_name, prompt="Hi", max_tokens=24, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 24
    assert out.choices[0].finish_reason == "length"


def test_logprobs_shape(client, model_name):
    out = complete(client, model_name, max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 3 <= len(top) <= 4
        values = list(top.values())
        # Greedy: the sampled token is the most likely one.
        assert math.isclose(max(values), logprob, abs_tol=1e-5) and top[token] == logprob
        assert all(v <= 0 for v in values)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_logprobs_streamed_match(client, model_name):
    full = complete(client, model_name, max_tokens=6, logprobs=2).choices[0].logprobs
    _, _, chunks = stream_text(client, model_name, max_tokens=6, logprobs=2)
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert streamed == full.tokens


def test_echo(client, model_name):
    out = complete(client, model_name, max_tokens=4, echo=True)
    plain = complete(client, model_name, max_tokens=4)
    assert out.choices[0].text == PROMPT + plain.choices[0].text
    with_lp = complete(client, model_name, max_tokens=4, echo=True, logprobs=1)
    lp = with_lp.choices[0].logprobs
    n_prompt = with_lp.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    texts, _, _ = stream_text(client, model_name, max_tokens=4, echo=True)
    assert texts[0] == out.choices[0].text


def test_stream_include_usage(client, model_name):
    chunks = list(
        complete(client, model_name, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason} == {"length"}


def test_logit_bias_forces_and_bans_tokens(client, model_name, http):
    forced = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][-1]
    reply = complete(client, model_name, max_tokens=4, logit_bias={str(forced): 100})
    assert http.post("/detokenize", json={"tokens": [forced] * 4}).json()["prompt"] == reply.choices[0].text
    free = complete(client, model_name, max_tokens=1)
    (first,) = http.post("/tokenize", json={"prompt": free.choices[0].text, "add_special_tokens": False}).json()["tokens"]
    banned = complete(client, model_name, max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].text not in ("", free.choices[0].text)


def test_bad_logit_bias_names_the_parameter(http, model_name):
    for bias in ({"abc": 1}, {"5": 101}, {"99999999": 1}, {"5": "x"}):
        response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, "max_tokens": 1,
                                                      "logit_bias": bias})
        assert_openai_error(response, 400, param="logit_bias")


def test_unknown_fields_are_rejected_by_name(http, model_name):
    for field, value in (("best_of", 2), ("not_a_field", 1), ("metadata", {"a": "b"})):
        response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, field: value})
        error = assert_openai_error(response, 400, param=field)
        assert field in error["message"]
    response = http.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": "hi"}], "store": True})
    assert_openai_error(response, 400, param="store")


def test_repetition_penalty_is_honoured(client, model_name, http):
    plain = complete(client, model_name, prompt=REPETITIVE, max_tokens=8)
    penalised = complete(client, model_name, prompt=REPETITIVE, max_tokens=8, extra_body={"repetition_penalty": 2.0})
    assert penalised.choices[0].text != plain.choices[0].text
    response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, "repetition_penalty": 0})
    assert_openai_error(response, 400, param="repetition_penalty")
