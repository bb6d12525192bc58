"""Property-based tests (hypothesis): whatever JSON a client sends, the request schemas
answer with a 200 or an OpenAI-shaped 4xx naming what is wrong, never a 500; whatever
bytes a training file holds, it renders or is refused naming its line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from server.errors import install_error_handlers
from server.finetune.job_request import CreateJobRequest
from server.finetune.training_data import TrainingDataError, render_training_file
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

pytestmark = pytest.mark.server

SCHEMAS = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/fine_tuning/jobs": CreateJobRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}

# Any JSON value: huge and tiny numbers, odd strings, deep nesting.
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
field_names = st.sampled_from(sorted({name for model in SCHEMAS.values() for name in model.model_fields}
                                     | {"messages.0", "bogus_field"}))
# Bodies that look like real requests: known field names with any values.
plausible_bodies = st.dictionaries(field_names, json_values, max_size=6)


@pytest.fixture(scope="module")
def http() -> TestClient:
    """Each request model behind a route that only validates, with the server's error handlers."""
    app = FastAPI()
    install_error_handlers(app)
    for path, model in SCHEMAS.items():
        def accept(body: model) -> dict:  # noqa: B023 (bound per route by FastAPI at definition)
            return {"ok": True}
        app.post(path)(accept)
    return TestClient(app)


def assert_ok_or_openai_4xx(response) -> None:
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(SCHEMAS)), body=plausible_bodies | json_values)
def test_any_json_body_is_accepted_or_refused_in_openai_shape(http, path, body):
    assert_ok_or_openai_4xx(http.post(path, content=json.dumps(body)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(SCHEMAS)), raw=st.binary(max_size=64))
def test_any_bytes_are_refused_in_openai_shape(http, path, raw):
    """Malformed JSON, invalid UTF-8, truncated bodies."""
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert_ok_or_openai_4xx(response)


def test_deep_nesting_and_huge_numbers(http):
    deep_object = '{"prompt": "x", "logit_bias": ' + '{"a": ' * 5000 + "{}" + "}" * 5000 + "}"
    deep_list = "[" * 100_000 + "]" * 100_000
    huge = ['{"prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", '{"prompt": "x", "temperature": 1e999}']
    for body in (deep_object, deep_list, *huge):
        assert_ok_or_openai_4xx(http.post("/v1/completions", content=body))


@pytest.fixture(scope="module")
def tokenizer():
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    return AutoTokenizer.from_pretrained(resolve_model(None, cache)[0])


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]), "content": json_values},
        optional={"weight": json_values},
    ),
    max_size=4,
)
examples = (
    st.fixed_dictionaries({"messages": messages})
    | st.fixed_dictionaries({"prompt": json_values, "completion": json_values})
    | json_values
)
lines = st.lists(examples.map(json.dumps).map(str.encode) | st.binary(max_size=30), min_size=1, max_size=5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines)
def test_training_files_render_or_are_refused_naming_the_line(tmp_path, tokenizer, lines):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        rendered = render_training_file(path, tokenizer, max_seq_len=256)
    except TrainingDataError as exc:
        assert "line " in str(exc) or "no examples" in str(exc), exc
        return
    assert rendered and all(len(e.token_ids) <= 256 and len(e.target) == len(e.token_ids) for e in rendered)
