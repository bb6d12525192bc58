"""Models, health, version, metrics, tokenize/detokenize, and every error's OpenAI shape."""

from __future__ import annotations

import pytest

from tests.server.conftest import assert_openai_error

pytestmark = pytest.mark.server


def test_models(client, http, model_name):
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == model_name == "SmolLM2-135M-Instruct"
    assert card["object"] == "model" and card["owned_by"] and card["root"] == model_name
    assert card["parent"] is None and card["max_model_len"] == 8192 and card["created"] > 0


def test_health_version_metrics(http, model_name):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total"):
        assert f'coserve:{name}{{model_name="{model_name}"}}' in text


def test_tokenize_round_trip(http, model_name):
    text = "Hello world, héllo 日本"
    out = http.post("/tokenize", json={"model": model_name, "prompt": text}).json()
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": out["tokens"]}).json()["prompt"] == text
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > out["count"] // 2


def test_unknown_model_404(http):
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert_openai_error(r, 404, param="model", code="model_not_found")
    assert_openai_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": [49152]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_params_400(http, body, param):
    assert_openai_error(http.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0",
        ),
    ],
)
def test_bad_chat_params_400(http, body, param):
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_context_length_errors(http):
    long_prompt = [1] * 8192
    error = assert_openai_error(http.post("/v1/completions", json={"prompt": long_prompt}), 400, param="prompt")
    assert "maximum context length is 8192 tokens" in error["message"]
    error = assert_openai_error(
        http.post("/v1/completions", json={"prompt": [1] * 8000, "max_tokens": 500}), 400, param="max_tokens"
    )
    assert "you requested 8500 tokens (8000 in the prompt, 500 in the completion)" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_malformed_json_and_unknown_route(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
