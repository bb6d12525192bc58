"""Structured outputs through the real openai client against the default model:
response_format (json_object, json_schema, pydantic via .parse) on chat, vLLM's
structured_outputs (json, regex, choice) on both endpoints, and the 400s for bad specs.

Every output must be complete (finish_reason "stop") and valid: a JSON cut off by
max_tokens does not count. The schemas bound their strings and arrays, so that the
135M model finishes them in a hundred tokens or so.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import assert_openai_error

pytestmark = pytest.mark.server

MAX_TOKENS = 300
# Sampled requests run at this temperature: at 1.0 the 135M model now and then spends
# its tokens on the whitespace JSON allows between elements (vLLM's default grammar).
SAMPLED = 0.7

CONTACT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "subscribed": {"type": "boolean"},
    },
    "required": ["name", "age", "subscribed"],
}
TICKET = {
    "type": "object",
    "properties": {
        "priority": {"enum": ["low", "medium", "high"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "labels": {"type": "array", "items": {"enum": ["bug", "ui", "docs", "perf"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["priority", "score", "labels"],
}
ORDER = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 30}, "city": {"type": "string", "maxLength": 20}},
            "required": ["name", "city"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string", "maxLength": 20},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["product", "quantity"],
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
}
READING = {
    "type": "object",
    "properties": {
        "sensor": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 60},
        "status": {"enum": ["ok", "warn", "fail"]},
    },
    "required": ["sensor", "celsius", "status"],
}
SCHEMAS = {
    "contact": (CONTACT, "Invent a newsletter contact."),
    "ticket": (TICKET, "Triage this report: the save button is slow."),
    "order": (ORDER, "Write down an order for two books to Paris."),
    "reading": (READING, "Report a temperature sensor reading."),
}


# A request may decode a few hundred tokens in a batch of a dozen on a busy 2-core machine.
TIMEOUT_S = 600


def ask(client, model, content: str, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.with_options(timeout=TIMEOUT_S).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def complete_text(choice) -> str:
    assert choice.finish_reason == "stop", f"cut off ({choice.finish_reason}): {choice.message.content!r}"
    return choice.message.content


def test_json_schema_outputs_parse_and_validate(client, model_name):
    """12 requests at once (greedy and sampled with two seeds) over four schemas."""
    jobs = [
        (name, {"temperature": 0.0} if seed is None else {"temperature": SAMPLED, "seed": seed})
        for name in SCHEMAS
        for seed in (None, 1, 2)
    ]

    def run(job):
        name, sampling = job
        schema, content = SCHEMAS[name]
        return name, ask(client, model_name, content, response_format=json_schema_format(name, schema), **sampling)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(run, jobs))
    for name, reply in replies:
        jsonschema.validate(json.loads(complete_text(reply.choices[0])), SCHEMAS[name][0])


class Landmark(BaseModel):
    name: str = Field(max_length=30)
    kind: Literal["museum", "tower", "park", "church"]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=40_000_000)
    landmark: Landmark


def test_parse_with_a_pydantic_model(client, model_name):
    reply = client.with_options(timeout=TIMEOUT_S).chat.completions.parse(
        model=model_name, messages=[{"role": "user", "content": "Describe the city of Paris."}],
        response_format=City, max_tokens=MAX_TOKENS, temperature=0,
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City)
    assert message.parsed == City.model_validate_json(message.content)


def test_json_object(client, model_name):
    reply = ask(client, model_name, 'Reply with a JSON object whose key "answer" holds the word yes.',
                response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(complete_text(reply.choices[0])), dict)


def test_n_choices_each_follow_the_schema(client, model_name):
    schema, content = SCHEMAS["ticket"]
    reply = ask(client, model_name, content, response_format=json_schema_format("t", schema), n=3, seed=5,
                temperature=SAMPLED)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        jsonschema.validate(json.loads(complete_text(choice)), schema)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": SAMPLED, "seed": 9}])
def test_streaming_agrees_with_non_streaming(client, model_name, sampling):
    schema, content = SCHEMAS["reading"]
    kw = dict(response_format=json_schema_format("r", schema), **sampling)
    full = complete_text(ask(client, model_name, content, **kw).choices[0])
    chunks = list(ask(client, model_name, content, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(full), schema)


PHONE = r"\(\d{3}\) \d{3}-\d{4}"
COLOURS = ["crimson", "teal", "ochre"]


def test_regex_and_choice_on_chat(client, model_name):
    phone = ask(client, model_name, "What is the phone number of the front desk?", temperature=0,
                extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, complete_text(phone.choices[0]))
    colour = ask(client, model_name, "Pick a colour for the logo.", temperature=0,
                 extra_body={"structured_outputs": {"choice": COLOURS}})
    assert complete_text(colour.choices[0]) in COLOURS


def test_logit_bias_is_honoured_under_a_grammar(client, model_name, http):
    """A +100 bias on the first token of another allowed choice makes it the greedy pick;
    with -100 on the greedy pick's first token, that token is not generated (the grammar
    may still spell the same word another way) and the answer is still a choice."""
    def pick(**kw):
        return ask(client, model_name, "Pick a colour for the logo.", temperature=0, logprobs=True,
                   extra_body={"structured_outputs": {"choice": COLOURS}}, **kw).choices[0]

    def first_token(word: str) -> int:
        return http.post("/tokenize", json={"prompt": word, "add_special_tokens": False}).json()["tokens"][0]

    free = pick()
    answer = complete_text(free)
    other = next(c for c in COLOURS if c != answer)
    assert complete_text(pick(logit_bias={str(first_token(other)): 100})) == other
    banned = free.logprobs.content[0].token
    banned_id = first_token(banned)
    assert http.post("/detokenize", json={"tokens": [banned_id]}).json()["prompt"] == banned
    unbiased = pick(logit_bias={str(banned_id): -100})
    assert complete_text(unbiased) in COLOURS and unbiased.logprobs.content[0].token != banned


def test_structured_outputs_on_completions(client, model_name):
    def complete(prompt: str, **extra):
        reply = client.with_options(timeout=TIMEOUT_S).completions.create(
            model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0]
        return reply.choices[0].text

    assert re.fullmatch(PHONE, complete("Call us at ", structured_outputs={"regex": PHONE}))
    assert complete("The logo colour is ", structured_outputs={"choice": COLOURS}) in COLOURS
    schema = SCHEMAS["contact"][0]
    jsonschema.validate(json.loads(complete("A contact record: ", structured_outputs={"json": schema})), schema)
    # vLLM takes OpenAI's response_format on completions too.
    jsonschema.validate(json.loads(complete("Contact: ", response_format=json_schema_format("c", schema))), schema)


CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": json_schema_format("x", {"type": "banana"})}, "response_format"),
        ({"response_format": json_schema_format("x", {"type": "integer", "minimum": 5, "maximum": 1})},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": {"type": "object", "properties": 5}}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= \"a\""}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, "structured_outputs.backend"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
         "response_format.json_schema"),
        # Valid schemas using what the grammar library would not enforce: refused, not ignored.
        ({"response_format": json_schema_format("x", {"type": "object", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}})}, "response_format"),
        ({"response_format": json_schema_format("x", {"allOf": [{"type": "object"}, {"required": ["a"]}]})},
         "response_format"),
        ({"response_format": json_schema_format("x", {"type": "object", "properties": {
            "n": {"$ref": "#/$defs/n", "maximum": 3}}, "$defs": {"n": {"type": "integer"}}})}, "response_format"),
        ({"structured_outputs": {"json": {"if": {"type": "string"}, "then": {"maxLength": 2}}}},
         "structured_outputs.json"),
    ],
)
def test_bad_structured_requests_400(http, extra, param):
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param=param)


def test_bad_structured_requests_400_on_completions(http):
    body = {"prompt": "x", "max_tokens": 4}
    for extra, param in [({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex"),
                         ({"response_format": json_schema_format("x", {"type": "banana"})}, "response_format")]:
        assert_openai_error(http.post("/v1/completions", json={**body, **extra}), 400, param=param)
