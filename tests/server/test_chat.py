"""/v1/chat/completions through the real openai client."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.server

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client, model, **kw):
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, **kw)


def test_chat_stream_equals_non_stream(client, model_name):
    full = chat(client, model_name)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content
    chunks = list(chat(client, model_name, stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_prompt_tokens_match_tokenize(client, model_name, http):
    count = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert chat(client, model_name, max_completion_tokens=3).usage.prompt_tokens == count


def test_chat_text_parts_and_system(client, model_name):
    parts = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]},
    ]
    out = chat(client, model_name, messages=parts, max_completion_tokens=4)
    assert out.usage.completion_tokens <= 4


def test_chat_logprobs(client, model_name):
    out = chat(client, model_name, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(tops[0], entry.logprob, abs_tol=1e-5)
    no_top = chat(client, model_name, logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)
    assert chat(client, model_name).choices[0].logprobs is None


def test_chat_n_seed_stop(client, model_name):
    kw = dict(temperature=1.0, seed=7, n=2, max_tokens=8)
    a, b = chat(client, model_name, **kw), chat(client, model_name, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    full = chat(client, model_name).choices[0].message.content
    word = full.split()[1]
    cut = chat(client, model_name, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(word)]
