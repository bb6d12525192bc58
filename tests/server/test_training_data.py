"""Training files -> token ids and loss masks, with the default model's real tokenizer
(SmolLM2, ChatML): which tokens are trained on, and every way a file is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.finetune.training_data import (
    MAX_REPORTED_ERRORS,
    DataSummary,
    RenderedExample,
    TrainingDataError,
    render_training_file,
    summarize,
)

pytestmark = pytest.mark.model

MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def tokenizer():
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    return AutoTokenizer.from_pretrained(resolve_model(None, cache)[0])


@pytest.fixture
def write(tmp_path):
    def write(*lines: bytes | str | dict) -> Path:
        """A file of these lines: bytes and str as they are, objects as JSON."""
        path = tmp_path / "train.jsonl"
        with path.open("wb") as out:
            for line in lines:
                text = json.dumps(line) if isinstance(line, dict) else line
                out.write((text if isinstance(text, bytes) else text.encode()) + b"\n")
        return path

    return write


def chat(*turns: tuple[str, str], **weights: int) -> dict:
    """A chat example from (role, content) pairs; `w<i>=0` sets the weight of message i."""
    messages = [{"role": role, "content": content} for role, content in turns]
    for key, weight in weights.items():
        messages[int(key[1:])]["weight"] = weight
    return {"messages": messages}


def trained_runs(example: RenderedExample, tokenizer) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(example.token_ids, example.target):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def inference_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids /v1/chat/completions builds for `messages` (server/prompts.py)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_chat_trains_on_assistant_content_and_end_of_turn_only(tokenizer, write):
    example = chat(("user", "What is 2+2?"), ("assistant", "It is 4."))
    [rendered] = render_training_file(write(example), tokenizer, MAX_SEQ_LEN)
    assert len(rendered.token_ids) == len(rendered.target) and not rendered.target[0]
    # The whole conversation, as the template renders it, with the assistant's tokens last
    # but for the separator after <|im_end|>.
    whole = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    assert rendered.token_ids == tokenizer.encode(whole, add_special_tokens=False)
    assert trained_runs(rendered, tokenizer) == ["It is 4.<|im_end|>"]
    prompt = inference_prompt(tokenizer, example["messages"][:1])
    assert rendered.token_ids[: len(prompt)] == prompt and not any(rendered.target[: len(prompt)])
    assert rendered.target[len(prompt)] and tokenizer.decode(rendered.token_ids[-1]) == "\n"
    assert not rendered.target[-1]


def test_multi_turn_with_system_and_a_weight_0_turn(tokenizer, write):
    example = chat(
        ("system", "Answer tersely."),
        ("user", "Hi"),
        ("assistant", "Hello there"),
        ("user", "Capital of France?"),
        ("assistant", "Paris"),
        ("user", "And Spain?"),
        ("assistant", "Madrid"),
        w4=0,
    )
    [rendered] = render_training_file(write(example), tokenizer, MAX_SEQ_LEN)
    assert trained_runs(rendered, tokenizer) == ["Hello there<|im_end|>", "Madrid<|im_end|>"]
    text = tokenizer.decode(rendered.token_ids)
    # The user's own system message replaces the template's default one and is never trained.
    assert text.startswith("<|im_start|>system\nAnswer tersely.<|im_end|>\n") and "SmolLM" not in text
    for cut in (2, 6):
        prompt = inference_prompt(tokenizer, example["messages"][:cut])
        assert rendered.token_ids[: len(prompt)] == prompt


def test_default_system_prompt_is_context(tokenizer, write):
    [rendered] = render_training_file(write(chat(("user", "Hi"), ("assistant", "Hey"))), tokenizer, MAX_SEQ_LEN)
    assert "SmolLM" in tokenizer.decode(rendered.token_ids)
    assert trained_runs(rendered, tokenizer) == ["Hey<|im_end|>"]


def test_content_starting_with_whitespace_is_tokenized_as_generated(tokenizer, write):
    # Encoded as one text, "assistant\n" + "\n\nHi" would merge newlines across the header boundary.
    example = chat(("user", "Hi"), ("assistant", "\n\nHi"), ("user", "x"), ("assistant", "  two spaces"))
    [rendered] = render_training_file(write(example), tokenizer, MAX_SEQ_LEN)
    assert trained_runs(rendered, tokenizer) == ["\n\nHi<|im_end|>", "  two spaces<|im_end|>"]
    prompt = inference_prompt(tokenizer, example["messages"][:1])
    content = tokenizer.encode("\n\nHi", add_special_tokens=False)
    assert rendered.token_ids[: len(prompt) + len(content)] == prompt + content


def test_prompt_completion(tokenizer, write):
    path = write({"prompt": "The sky is", "completion": " blue."}, {"prompt": "1, 2,", "completion": ""})
    first, second = render_training_file(path, tokenizer, MAX_SEQ_LEN)
    prompt = tokenizer.encode("The sky is")
    assert first.token_ids == prompt + tokenizer.encode(" blue.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert first.target == [False] * len(prompt) + [True] * (len(first.token_ids) - len(prompt))
    assert trained_runs(first, tokenizer) == [" blue.<|im_end|>"]
    # An empty completion still teaches the model to stop.
    assert trained_runs(second, tokenizer) == ["<|im_end|>"]


def test_blank_lines_are_skipped_and_summary_counts(tokenizer, write):
    path = write("", chat(("user", "a"), ("assistant", "b")), "   ", chat(("user", "c"), ("assistant", "d")))
    examples = render_training_file(path, tokenizer, MAX_SEQ_LEN)
    assert len(examples) == 2
    summary = summarize(examples)
    assert summary == DataSummary(
        examples=2,
        tokens=sum(len(e.token_ids) for e in examples),
        target_tokens=4,  # "b", <|im_end|>, "d", <|im_end|>
    )


def test_the_longest_allowed_example_fits(tokenizer, write):
    path = write(chat(("user", "Hi"), ("assistant", "Hello")))
    [rendered] = render_training_file(path, tokenizer, MAX_SEQ_LEN)
    assert render_training_file(path, tokenizer, len(rendered.token_ids)) == [rendered]
    with pytest.raises(TrainingDataError, match=rf"^line 1: the example is {len(rendered.token_ids)} tokens long"):
        render_training_file(path, tokenizer, len(rendered.token_ids) - 1)


GOOD = chat(("user", "Hi"), ("assistant", "Hello"))
GOOD_PC = {"prompt": "a", "completion": "b"}


@pytest.mark.parametrize(
    "lines, line, problem",
    [
        ([GOOD, '{"messages": [}'], 2, "invalid JSON"),
        ([b"\xff\xfe{}"], 1, "not valid UTF-8"),
        (['{"messages": [{"role": "user", "content": "hi \\ud800"}]}'], 1,
         "messages[0].content holds a lone surrogate"),
        (["[1, 2]"], 1, "must be a JSON object, not an array"),
        ([{"text": "hi"}], 1, "expected a chat example"),
        ([{**GOOD, "tools": []}], 1, "tools must be a non-empty array"),
        ([{"messages": []}], 1, "messages must be a non-empty array"),
        ([{"messages": "hi"}], 1, "messages must be a non-empty array"),
        ([{"messages": ["hi"]}], 1, "messages[0] must be an object, not a string"),
        ([GOOD, {"messages": [{"content": "hi"}]}], 2, "messages[0] is missing 'role'"),
        ([{"messages": [{"role": "user"}]}], 1, "messages[0] is missing 'content'"),
        (
            [chat(("user", "Hi"), ("tool", "42"), ("assistant", "ok"))],
            1,
            "messages[1] is missing 'tool_call_id'",
        ),
        (
            [{"messages": [{"role": "user", "content": None}, GOOD["messages"][1]]}],
            1,
            "messages[0].content must be a string, not null",
        ),
        (
            [{"messages": [GOOD["messages"][0], {"role": "assistant", "content": "x", "name": "bot"}]}],
            1,
            "messages[1] has unknown key(s) 'name'",
        ),
        (
            [chat(("user", "Hi"), ("assistant", "x"), w0=1)],
            1,
            "messages[0].weight is only allowed on assistant messages",
        ),
        ([chat(("user", "Hi"), ("assistant", "x"), w1=2)], 1, "messages[1].weight must be 0 or 1, not 2"),
        ([chat(("user", "Hi"), ("assistant", "x"), w1=True)], 1, "messages[1].weight must be 0 or 1, not true"),
        ([chat(("assistant", "Hello"), ("user", "Hi"), ("assistant", "x"))], 1, "messages[0] is an assistant message"),
        ([GOOD, GOOD, chat(("system", "s"), ("user", "Hi"))], 3, "no assistant message"),
        (
            [chat(("user", "Hi"), ("assistant", "x"), ("user", "y"), ("assistant", "z"), w1=0, w3=0)],
            1,
            "every assistant message has weight 0",
        ),
        ([GOOD, "", GOOD_PC], 3, "a prompt/completion example, but line 1 is a chat example"),
        ([GOOD_PC, GOOD], 2, "a chat example, but line 1 is a prompt/completion example"),
        ([{"prompt": "a"}], 1, "the example is missing 'completion'"),
        ([{**GOOD_PC, "weight": 1}], 1, "unknown key(s) 'weight'"),
        ([{"prompt": 1, "completion": "b"}], 1, "prompt must be a string, not a number"),
        ([{"prompt": "a", "completion": ["b"]}], 1, "completion must be a string, not an array"),
        ([{"prompt": "", "completion": "b"}], 1, "prompt must not be empty"),
    ],
)
def test_refused_lines_are_named(tokenizer, write, lines, line, problem):
    with pytest.raises(TrainingDataError) as raised:
        render_training_file(write(*lines), tokenizer, MAX_SEQ_LEN)
    assert str(raised.value).startswith(f"line {line}: ") and problem in str(raised.value)


@pytest.mark.parametrize("contents", ["", "\n\n  \n"])
def test_empty_file(tokenizer, tmp_path, contents):
    path = tmp_path / "empty.jsonl"
    path.write_text(contents)
    with pytest.raises(TrainingDataError, match="^the training file has no examples$"):
        render_training_file(path, tokenizer, MAX_SEQ_LEN)


def test_problems_are_collected_up_to_a_limit(tokenizer, write):
    path = write(GOOD, "nope", GOOD, {"messages": []}, GOOD)
    with pytest.raises(TrainingDataError) as raised:
        render_training_file(path, tokenizer, MAX_SEQ_LEN)
    message = str(raised.value)
    assert message.startswith("line 2: invalid JSON") and "; line 4: messages must be" in message
    assert "line 1" not in message and "line 3" not in message and "stopped" not in message

    path = write(*["nope"] * (MAX_REPORTED_ERRORS + 5))
    with pytest.raises(TrainingDataError) as raised:
        render_training_file(path, tokenizer, MAX_SEQ_LEN)
    message = str(raised.value)
    assert f"line {MAX_REPORTED_ERRORS}: " in message and f"line {MAX_REPORTED_ERRORS + 1}: " not in message
    assert message.endswith(f"(checking stopped at the {MAX_REPORTED_ERRORS}th problem)")


def test_template_problems(tokenizer, write, monkeypatch):
    path = write(GOOD, GOOD_PC)
    # A template that announces the conversation's length up front renders no prefix of itself.
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{{ messages|length }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    with pytest.raises(
        TrainingDataError, match=r"^line 1: cannot locate the tokens of messages\[1\].*not prefix-stable"
    ):
        render_training_file(write(GOOD), tokenizer, MAX_SEQ_LEN)
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(
        TrainingDataError, match="^line 1: the model's chat template refused the conversation: roles must alternate"
    ):
        render_training_file(path, tokenizer, MAX_SEQ_LEN)
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(TrainingDataError, match="^line 1: this model has no chat template"):
        render_training_file(path, tokenizer, MAX_SEQ_LEN)


# ---- OpenAI's fine-tuning format for function calling ---------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASKED = {"role": "user", "content": "Weather in Paris?"}
CALLED = {"role": "assistant", "tool_calls": [CALL]}
ANSWERED = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
TOOL_EXAMPLE = {"messages": [ASKED, CALLED, ANSWERED, {"role": "assistant", "content": "It is 18 C."}],
                "tools": [WEATHER_TOOL]}


def test_tool_calls_are_trained_as_the_served_model_writes_them(tokenizer, write):
    from server.prompts import PromptEncoder
    from server.protocol import ChatMessage
    from server.tools import markup

    [rendered] = render_training_file(write(TOOL_EXAMPLE), tokenizer, MAX_SEQ_LEN)
    call = markup.call_block("get_weather", {"city": "Paris"})
    assert trained_runs(rendered, tokenizer) == [f"{call}<|im_end|>", "It is 18 C.<|im_end|>"]
    # Serving renders the same prompt for the first turn (server/prompts.py), tools and all.
    encoder = PromptEncoder(tokenizer, len(tokenizer), MAX_SEQ_LEN)
    served = encoder.chat_prompt([ChatMessage.model_validate(ASKED)], [WEATHER_TOOL])
    assert rendered.token_ids[: len(served)] == served and not any(rendered.target[: len(served)])
    assert rendered.target[len(served)]  # the call is the first thing trained
    # ... and the conversation through the tool result, with the result as context only.
    history = [ChatMessage.model_validate(m) for m in TOOL_EXAMPLE["messages"][:3]]
    served = encoder.chat_prompt(history, [WEATHER_TOOL])
    assert rendered.token_ids[: len(served)] == served
    assert tokenizer.decode([t for t, trained in zip(served, rendered.target) if trained]) == f"{call}<|im_end|>"


def test_parallel_calls_and_content_beside_calls(tokenizer, write):
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    example = {"messages": [ASKED, {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]}],
               "tools": [WEATHER_TOOL], "parallel_tool_calls": True}
    [rendered] = render_training_file(write(example), tokenizer, MAX_SEQ_LEN)
    from server.tools import markup

    calls = markup.call_block("get_weather", {"city": "Paris"}) + "\n" + markup.call_block("get_weather", {"city": "Rome"})
    assert trained_runs(rendered, tokenizer) == [f"Checking.\n{calls}<|im_end|>"]


def with_messages(*messages: dict, **extra) -> dict:
    return {"messages": [ASKED, *messages], "tools": [WEATHER_TOOL], **extra}


@pytest.mark.parametrize(
    "example, problem",
    [
        ({**TOOL_EXAMPLE, "tools": [{"type": "function"}]}, "tools[0].function: Field required"),
        ({**TOOL_EXAMPLE, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
         "tools[0].function.parameters: Value error, not a valid JSON schema"),
        ({**TOOL_EXAMPLE, "tools": {"name": "f"}}, "tools: Input should be a valid list"),
        ({**TOOL_EXAMPLE, "functions": []}, "unknown key(s) 'functions'"),
        ({**TOOL_EXAMPLE, "parallel_tool_calls": "no"}, 'parallel_tool_calls must be true or false, not "no"'),
        (with_messages({"role": "robot", "content": "x"}), 'messages[1].role must be one of system, user, assistant, tool'),
        (with_messages({"role": "assistant", "tool_calls": []}), "messages[1].tool_calls must be a non-empty array"),
        (with_messages({"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}),
         'messages[1].tool_calls[0].type must be "function", not "code"'),
        (with_messages({"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}),
         "messages[1].tool_calls[0] is missing 'function'"),
        (with_messages({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "launch", "arguments": "{}"}}]}),
         'messages[1].tool_calls[0].function.name "launch" is not among the example\'s tools'),
        (with_messages({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": {}}}]}),
         "messages[1].tool_calls[0].function.arguments must be a string of JSON, not an object"),
        (with_messages({"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}]}),
         "messages[1].tool_calls[0].function.arguments: must be a JSON object"),
        (with_messages({"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_2"}]}, parallel_tool_calls=False),
         "messages[1] makes 2 tool calls, but parallel_tool_calls is false"),
        (with_messages({"role": "assistant", "content": None}), "messages[1].content must be a string, not null"),
        (with_messages({"role": "user", "content": "x", "tool_calls": [CALL]}),
         "messages[1].tool_calls is only allowed on assistant messages"),
        (with_messages(CALLED, {"role": "tool", "tool_call_id": "call_9", "content": "1"}, {"role": "assistant", "content": "x"}),
         'messages[2].tool_call_id "call_9" answers no tool call of an earlier assistant message'),
        (with_messages(CALLED, {"role": "tool", "content": "1"}), "messages[2] is missing 'tool_call_id'"),
    ],
)
def test_refused_tool_examples_name_the_line_and_field(tokenizer, write, example, problem):
    with pytest.raises(TrainingDataError) as raised:
        render_training_file(write(GOOD, example), tokenizer, MAX_SEQ_LEN)
    assert str(raised.value).startswith("line 2: ") and problem in str(raised.value), str(raised.value)
