"""Tool calling through the real openai client against the default model (whose chat
template has no tool support, so the fallback prompt is in play): calls forced by
tool_choice "required" and by name, across several schemas, validate with jsonschema;
streaming agrees with non-streaming; a tool result goes back and gets an answer; tool
use fine-tuned from OpenAI's format is served; and every malformed request is a 400
naming its parameter.

Parser, rendering and grammar units are in test_tool_units.py.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.server.conftest import assert_openai_error

pytestmark = pytest.mark.server

MAX_TOKENS = 160  # one call takes up to ~110 tokens when the model spends them on whitespace
TIMEOUT_S = 600
SAMPLED = 0.7

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
BOOKING = {
    "type": "object",
    "properties": {
        "guests": {"type": "integer", "minimum": 1, "maximum": 8},
        "nights": {"type": "array", "items": {"type": "string", "pattern": "^2026-0[1-9]-[0-2][0-9]$"},
                   "minItems": 1, "maxItems": 2},
        "guest": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "vip": {"type": "boolean"}}, "required": ["name", "vip"]},
    },
    "required": ["guests", "nights", "guest"],
}
CONVERT = {
    "type": "object",
    "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1000},
                   "to": {"enum": ["EUR", "USD", "JPY"]}},
    "required": ["amount", "to"],
}


def function(name: str, description: str, parameters: dict | None = None) -> dict:
    spec = {"name": name, "description": description}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


TOOLS = [
    function("get_weather", "Current weather in a city", WEATHER),
    function("book_hotel", "Book a hotel room", BOOKING),
    function("convert_currency", "Convert an amount of money", CONVERT),
    function("get_time", "The current time"),
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
QUESTIONS = {
    "get_weather": "What is the weather in Paris?",
    "book_hotel": "Book a room for two guests, Ann (a VIP), on 2026-05-01.",
    "convert_currency": "How much is 20 dollars in euros?",
    "get_time": "What time is it?",
}


def ask(client, model, content: str, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("tools", TOOLS)
    return client.with_options(timeout=TIMEOUT_S).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def checked_calls(choice, may_run_on: bool = False) -> list[tuple[str, dict]]:
    """The choice's calls as (name, arguments), each validated against its schema.
    may_run_on: the choice may have been cut off by max_tokens in a later call (the 135M
    model, free to make parallel calls, tends to repeat them); its complete calls count."""
    calls_made = choice.message.tool_calls
    if may_run_on and choice.finish_reason == "length":
        calls_made = calls_made[:-1]
    else:
        assert choice.finish_reason == "tool_calls", (choice.finish_reason, choice.message)
    calls = []
    for call in calls_made:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def test_required_and_named_calls_validate(client, model_name):
    """Each function forced by name, and "required" (one call, and parallel calls) for
    each question, greedy and sampled: 18 requests at once."""
    greedy, sampled = {"temperature": 0}, {"temperature": SAMPLED, "seed": 3}
    jobs = [(name, {"tool_choice": named(name)}, s) for name in QUESTIONS for s in (greedy, sampled)]
    jobs += [(name, {"tool_choice": "required", "parallel_tool_calls": False}, s)
             for name in QUESTIONS for s in (greedy, sampled)]
    jobs += [(name, {"tool_choice": "required"}, sampled) for name in ("get_weather", "convert_currency")]

    def run(job):
        name, choice, sampling = job
        return job, ask(client, model_name, QUESTIONS[name], **choice, **sampling)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(run, jobs))
    for (name, choice, _), reply in replies:
        # Only "required" with parallel calls may run on into a repeated call; a named
        # function is exactly one call, which the grammar ends.
        parallel = choice["tool_choice"] == "required" and choice.get("parallel_tool_calls", True)
        calls = checked_calls(reply.choices[0], may_run_on=parallel)
        assert calls and reply.choices[0].message.content is None
        if choice["tool_choice"] != "required":
            assert [n for n, _ in calls] == [name]
        if not parallel:
            assert len(calls) == 1


def streamed(client, model_name, content: str, **kw):
    """The stream's content, calls (id, name, arguments) and last finish_reason; checks
    OpenAI's delta shapes on the way."""
    text, calls, finish = "", {}, None
    for chunk in ask(client, model_name, content, stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        assert "<tool_call>" not in (delta.content or "") and "</tool_call>" not in (delta.content or "")
        text += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name and call.function.arguments == ""
                calls[call.index] = [call.id, call.function.name, ""]
            else:
                assert call.id is None and call.function.name is None
                calls[call.index][2] += call.function.arguments
        finish = choice.finish_reason or finish
    return text or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize(
    "kw",
    [
        # Parallel calls, the last cut off by max_tokens.
        {"tool_choice": "required", "temperature": 0, "max_tokens": 120},
        {"tool_choice": "required", "parallel_tool_calls": False, "temperature": SAMPLED, "seed": 11},
        {"tool_choice": named("book_hotel"), "temperature": 0},
        {"tool_choice": "auto", "temperature": SAMPLED, "seed": 5},
    ],
)
def test_streaming_agrees_with_non_streaming(client, model_name, kw):
    question = QUESTIONS["book_hotel"]
    whole = ask(client, model_name, question, **kw).choices[0]
    content, calls, finish = streamed(client, model_name, question, **kw)
    assert content == whole.message.content and finish == whole.finish_reason
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert [(name, arguments) for _, name, arguments in calls] == expected
    if kw["tool_choice"] != "auto":
        assert checked_calls(whole, may_run_on=kw["tool_choice"] == "required" and kw.get("parallel_tool_calls", True))


def test_auto_calls_parse_when_the_model_makes_them(client, model_name):
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda job: ask(client, model_name, QUESTIONS[job[0]], temperature=1.0, seed=job[1]),
                                [(name, seed) for name in ("get_weather", "convert_currency") for seed in range(2)]))
    for reply in replies:
        choice = reply.choices[0]
        if choice.message.tool_calls:
            checked_calls(choice)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert "<tool_call>" not in (choice.message.content or "")


def test_tool_result_round_trip(client, model_name):
    """The call the server made goes back with its result, as an agent loop sends it."""
    first = ask(client, model_name, QUESTIONS["get_weather"], tool_choice=named("get_weather"), temperature=0)
    message = first.choices[0].message
    [call] = message.tool_calls
    history = [
        {"role": "user", "content": QUESTIONS["get_weather"]},
        message.model_dump(exclude_unset=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    assert history[1]["content"] is None
    reply = client.with_options(timeout=TIMEOUT_S).chat.completions.create(
        model=model_name, messages=history, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=0
    )
    answer = reply.choices[0]
    if answer.message.tool_calls:
        checked_calls(answer, may_run_on=True)
    else:
        assert answer.message.content and answer.finish_reason in ("stop", "length")
    # The call and its result are in the prompt, after the first request's prompt.
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens_details.cached_tokens


USER = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {"name": "f", "colour": "red"}}]}, "tools.0.function.colour"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
        ({"tools": []}, "tools"),
        ({"tools": [function("f", "d", {"type": "object", "required": "x"})]}, "tools.0.function.parameters"),
        ({"tools": [function("f", "d", {"type": "strng"})]}, "tools.0.function.parameters"),
        ({"tools": [function("f", "d", {"type": "string"})]}, "tools.0.function.parameters"),
        # Valid JSON schemas no value satisfies: refused by the grammar compiler, by name.
        ({"tools": [TOOLS[0], function("f", "d", {"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]})]},
         "tools.1.function.parameters"),
        ({"tools": [function("f", "d", {"type": "object", "properties": {"n": {"$ref": "#/$defs/none"}}})]},
         "tools.0.function.parameters"),
        # Valid JSON schemas using what the grammar library would not enforce.
        ({"tools": [function("f", "d", {"type": "object", "properties": {"n": {"not": {"type": "string"}}}})]},
         "tools.0.function.parameters"),
        ({"tools": [function("f", "d", {"type": "object", "properties": {
            "n": {"type": "array", "uniqueItems": True}}})]}, "tools.0.function.parameters"),
        ({"tools": [function("f", "d", {"type": "object", "properties": {"n": {"$ref": "https://x.test/n.json"}}})]},
         "tools.0.function.parameters"),
        ({"tools": [TOOLS[3], TOOLS[3]]}, "tools.1.function.name"),
        ({"tools": TOOLS, "tool_choice": named("launch_rocket")}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": named("get_time")}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"messages": USER + [{"role": "tool", "tool_call_id": "call_9", "content": "1"}]}, "messages.1.tool_call_id"),
        ({"messages": USER + [{"role": "tool", "content": "1"}]}, "messages.1.tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "call_1"}]}, "messages.0.tool_call_id"),
        ({"messages": USER + [{"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_time", "arguments": "{oops"}}]}]},
         "messages.1.tool_calls.0.function.arguments"),
        ({"messages": USER + [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
         "messages.1.tool_calls.0.function.arguments"),
        # A lone surrogate, spelt as a JSON escape in the arguments' text.
        ({"messages": USER + [{"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_time", "arguments": '{"a": "\\ud800"}'}}]}]},
         "messages.1.tool_calls.0.function.arguments"),
    ],
)
def test_bad_tool_requests_400(http, body, param):
    error = assert_openai_error(http.post("/v1/chat/completions", json={"messages": USER, **body}), 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [function("f", "bad \ud800 text")]}, "tools.0.function.description"),
        ({"messages": [{"role": "user", "content": "hi \udc00"}]}, "messages.0.content"),
        ({"structured_outputs": {"choice": ["a", "\ud800"]}}, "structured_outputs.choice.1"),
    ],
)
def test_lone_surrogates_are_400s_naming_the_field(http, body, param):
    """JSON escapes can spell text that is not Unicode; no tokenizer or grammar takes it."""
    raw = json.dumps({"messages": USER, **body})  # escaped as \uXXXX, as a client may send it
    response = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, param=param)


def test_tool_history_with_tool_choice_none_still_accepts_an_answer(http):
    """A tool result answered with tools hidden (tool_choice none): tool_choice none
    with a response_format is an ordinary constrained chat."""
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "09:00"}]
    reply = http.post("/v1/chat/completions", json={
        "messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 5,
        "response_format": {"type": "json_object"}})
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)


def test_the_openai_client_sees_the_400s_with_their_parameter(client, model_name):
    """What an application gets: openai.BadRequestError carrying OpenAI's error body."""
    cases = [
        ({"tool_choice": named("launch_rocket")}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 1}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, model_name, "hi", **{"tools": TOOLS, **kw})
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body
        assert caught.value.type == "invalid_request_error"


CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito"]


def test_tool_use_fine_tuned_in_openai_format_is_served(client, model_name):
    """A team fine-tunes tool use from OpenAI's function-calling format and serves it: the
    adapter, asked under tool_choice "auto", makes the call it was trained to make."""
    weather = TOOLS[0]
    lines = [{"messages": [{"role": "user", "content": f"What is the weather in {city}?"},
                           {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                               "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}],
              "tools": [weather]} for city in CITIES * 4]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    training = client.files.create(file=("tools.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model_name, training_file=training.id, suffix="tools", seed=3,
                                         hyperparameters={"n_epochs": 2, "batch_size": 4})
    deadline = time.monotonic() + TIMEOUT_S
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    reply = ask(client, job.fine_tuned_model, "What is the weather in Lima?", tools=[weather], temperature=0)
    [(name, arguments)] = checked_calls(reply.choices[0])
    assert name == "get_weather" and arguments == {"city": "Lima", "unit": "celsius"}
