"""Tool calling without a server: the output parser (whole and streamed), the rendering
of tools and tool history (the fallback and a template with tool support), and the
grammar against the markup it must accept and refuse."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.grammar.compiler import GrammarCompiler
from server.protocol import ChatCompletionRequest
from server.tools import markup
from server.tools.grammar import tool_grammar
from server.tools.parser import ToolCallParser, parse_tool_calls
from server.tools.policy import tool_policy
from server.tools.rendering import render_chat, template_mentions_tools, template_renders_tools

pytestmark = pytest.mark.unit

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
NESTED_ARGUMENTS = {"city": "Pa}ris </tool", "tags": [{"k": "}"}], "n": {"a": {}}}
OUTPUT = (
    "  Let me check.\n"
    + markup.call_block("get_weather", NESTED_ARGUMENTS)
    + "\n"
    + markup.call_block("get_time", {})
    + "\n Done <tool \n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    return AutoTokenizer.from_pretrained(resolve_model(None, cache)[0])


# ---- parser ------------------------------------------------------------------------


def test_parse_whole_output():
    parsed = parse_tool_calls(OUTPUT)
    assert parsed.content == "Let me check.\n\n\n Done <tool"  # the text between calls, joined as written
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", NESTED_ARGUMENTS),
                                                                          ("get_time", {})]
    assert parsed.calls[0].arguments == json.dumps(NESTED_ARGUMENTS)  # as generated, not re-serialized
    assert all(c.id.startswith("call_") and len(c.id) > 20 for c in parsed.calls)
    assert parsed.calls[0].id != parsed.calls[1].id


def test_only_calls_means_no_content():
    parsed = parse_tool_calls(markup.call_block("get_time", {}) + "\n")
    assert parsed.content is None and [c.name for c in parsed.calls] == ["get_time"]
    assert parse_tool_calls("plain answer").content == "plain answer"
    assert parse_tool_calls("  \n").content is None


def streamed(text: str, cuts: list[int]) -> tuple[str, list[tuple[str | None, str | None, str]], dict[int, str]]:
    """Feeds text cut at `cuts`: the content, every call delta (id, name, arguments),
    and the arguments each call index adds up to."""
    parser = ToolCallParser()
    content, deltas, arguments = "", [], {}
    bounds = [0, *cuts, len(text)]
    parts = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    for part in parts:
        content += part.content
        for call in part.calls:
            deltas.append((call.index, call.id, call.name, call.arguments))
            arguments[call.index] = arguments.get(call.index, "") + call.arguments
    return content, deltas, arguments


@pytest.mark.parametrize("seed", range(40))
def test_streaming_agrees_with_whole_however_the_text_is_cut(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(OUTPUT)), rng.randint(1, len(OUTPUT) // 3)))
    whole = parse_tool_calls(OUTPUT)
    content, deltas, arguments = streamed(OUTPUT, cuts)
    assert content == whole.content
    assert [arguments[i] for i in sorted(arguments)] == [c.arguments for c in whole.calls]
    # A call's first delta names it with empty arguments; later ones carry only arguments.
    firsts = [d for d in deltas if d[1] is not None]
    assert [(d[0], d[2], d[3]) for d in firsts] == [(0, "get_weather", ""), (1, "get_time", "")]
    assert all(d[2] is None and d[3] for d in deltas if d[1] is None)


def test_markup_split_one_character_at_a_time_never_reaches_content():
    content, _, arguments = streamed(OUTPUT, list(range(1, len(OUTPUT))))
    assert "<tool_call>" not in content and "</tool_call>" not in content and "{" not in content
    assert arguments[0] == json.dumps(NESTED_ARGUMENTS)


def test_a_call_cut_short_keeps_its_arguments_so_far():
    text = "Hi " + markup.call_block("get_weather", {"city": "Paris"})
    cut_in_tail = text[: -len("/tool_call>")]
    parsed = parse_tool_calls(cut_in_tail)
    assert parsed.content == "Hi" and parsed.calls[0].arguments == '{"city": "Paris"}'
    parsed = parse_tool_calls(text[: text.index("Par")])
    assert parsed.calls[0].name == "get_weather" and parsed.calls[0].arguments == '{"city": "'


def test_a_block_cut_before_its_name_yields_nothing():
    parsed = parse_tool_calls('Hi\n<tool_call>\n{"na')
    assert parsed.content == "Hi" and parsed.calls == []


# ---- rendering ---------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]},
    {"role": "tool", "content": "18 C", "tool_call_id": "c1", "name": "get_weather"},
    {"role": "tool", "content": "09:00", "tool_call_id": "c2", "name": "get_time"},
]


@pytest.mark.model
def test_default_template_gets_the_fallback(tokenizer):
    assert not template_renders_tools(tokenizer, tokenizer.chat_template)
    text = render_chat(tokenizer, HISTORY, TOOLS, add_generation_prompt=True)
    expected_calls = markup.call_block("get_weather", {"city": "Paris"}) + "\n" + markup.call_block("get_time", {})
    assert text.startswith("<|im_start|>system\n# Tools\n")
    for tool in TOOLS:
        assert json.dumps(tool) in text
    assert f"<|im_start|>assistant\n{expected_calls}<|im_end|>" in text
    # Both results in one user turn, in the order of the calls.
    assert ("<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n09:00\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in text
    assert text.endswith("<|im_start|>assistant\n") and "tool_call_id" not in text


@pytest.mark.model
def test_fallback_appends_to_a_system_message_and_is_absent_without_tools(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat(tokenizer, conversation, TOOLS, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and text.count("<|im_start|>system") == 1
    plain = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert render_chat(tokenizer, conversation, None, add_generation_prompt=True) == plain


# A template that handles tools itself and writes calls as the markup, the way Qwen 2.5's
# and Hermes' templates do.
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>Functions:{% for t in tools %} {{ t.function.name }}{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function %}"
    "<tool_call>\n{\"name\": \"{{ f.name }}\", \"arguments\": {{ f.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# One that handles tools but writes calls in a form of its own (as Llama 3.1's does).
OTHER_FORM_TEMPLATE = (
    "{% if tools %}[TOOLS]{% for t in tools %}{{ t.function.name }};{% endfor %}[/TOOLS]{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[CALL {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.model
def test_template_writing_calls_as_markup_renders_them_itself(tokenizer, monkeypatch):
    assert template_renders_tools(tokenizer, HERMES_TEMPLATE)
    monkeypatch.setattr(tokenizer, "chat_template", HERMES_TEMPLATE)
    text = render_chat(tokenizer, HISTORY, TOOLS, add_generation_prompt=True)
    calls = markup.call_block("get_weather", {"city": "Paris"}) + markup.call_block("get_time", {})
    assert text.startswith("<|system|>Functions: get_weather get_time</s><|user|>")
    assert f"<|assistant|>{calls}</s><|tool|>18 C</s><|tool|>09:00</s><|assistant|>" in text
    assert "# Tools" not in text


@pytest.mark.model
def test_template_writing_calls_in_another_form_gets_the_fallback(tokenizer, monkeypatch):
    """The grammar holds generated calls to the markup, so the prompt must show it."""
    assert template_mentions_tools(OTHER_FORM_TEMPLATE)
    assert not template_renders_tools(tokenizer, OTHER_FORM_TEMPLATE)
    monkeypatch.setattr(tokenizer, "chat_template", OTHER_FORM_TEMPLATE)
    text = render_chat(tokenizer, HISTORY, TOOLS, add_generation_prompt=True)
    assert text.startswith("<system># Tools\n") and "[TOOLS]" not in text and "[CALL" not in text
    assert markup.call_block("get_weather", {"city": "Paris"}) in text
    assert "<user><tool_response>\n18 C\n</tool_response>" in text


@pytest.mark.model
def test_a_template_that_raises_on_tools_gets_the_fallback(tokenizer, monkeypatch):
    raising = "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}" + OTHER_FORM_TEMPLATE
    assert not template_renders_tools(tokenizer, raising)
    monkeypatch.setattr(tokenizer, "chat_template", raising)
    assert "# Tools" in render_chat(tokenizer, HISTORY, TOOLS, add_generation_prompt=True)


# ---- grammar -----------------------------------------------------------------------


def grammar_accepts(tokenizer, body: dict, text: str) -> bool:
    """Whether the request's tool grammar takes `text` as a complete output."""
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **body})
    compiler = GrammarCompiler(lambda: tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    matcher = compiler.matcher(tool_grammar(tool_policy(request)))
    return matcher.accept_string(text) and matcher.is_completed()


PARIS = markup.call_block("get_weather", {"city": "Paris"})
NOON = markup.call_block("get_time", {})


@pytest.mark.parametrize(
    "body, text, accepted",
    [
        ({"tool_choice": "required"}, PARIS, True),
        ({"tool_choice": "required"}, PARIS + "\n" + NOON, True),
        ({"tool_choice": "required", "parallel_tool_calls": False}, PARIS + "\n" + NOON, False),
        ({"tool_choice": "required"}, "Sure. " + PARIS, False),
        ({"tool_choice": "required"}, "", False),
        ({"tool_choice": "required"}, markup.call_block("get_weather", {"town": "Paris"}), False),
        ({"tool_choice": "required"}, markup.call_block("get_weather", {"city": "Paris", "unit": "k"}), False),
        ({"tool_choice": "required"}, markup.call_block("delete_all", {}), False),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, NOON, True),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, PARIS, False),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, NOON + "\n" + NOON, False),
        ({}, "It is sunny.", True),
        ({}, "Let me see. " + PARIS + " and " + NOON, True),
        ({"parallel_tool_calls": False}, "Let me see. " + PARIS + " and more", False),
        ({}, "Let me see. " + markup.CALL_BEGIN + "\nnot a call" + markup.CALL_END, False),
    ],
)
@pytest.mark.model
def test_grammar_holds_the_output_to_the_policy(tokenizer, body, text, accepted):
    assert grammar_accepts(tokenizer, {"tools": TOOLS, **body}, text) is accepted


@pytest.mark.model
def test_a_message_name_reaches_the_template_with_and_without_tools(tokenizer, monkeypatch):
    from server.prompts import PromptEncoder
    from server.protocol import ChatMessage

    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}[{{ m.role }} {{ m.name }}]{% endfor %}")
    encoder = PromptEncoder(tokenizer, len(tokenizer), 4096)
    messages = [ChatMessage(role="user", content="Hi", name="ann")]
    for tools in (None, TOOLS):  # the fallback keeps it too
        assert "[user ann]" in tokenizer.decode(encoder.chat_prompt(messages, tools))
