"""Uploaded JSONL training files -> token ids and loss masks for the engine.

Two formats, as OpenAI accepts them; the file's first example picks one and every line
must then use it:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}
    {"prompt": "...", "completion": "..."}

A chat example may teach tool use in OpenAI's format for function calling: `tools` (as
/v1/chat/completions takes them, checked the same way), assistant messages with
`tool_calls` (content then optional; arguments as JSON text), `tool` messages answering
them by `tool_call_id`, and `parallel_tool_calls: false` to say no turn makes more than
one call. Tools and tool history are rendered by server/tools/rendering.py, as serving
renders them, so an assistant turn trains on the very call blocks the served model is
held to by its grammar.

A chat example is rendered with the model's chat template, as /v1/chat/completions
renders a prompt, and is trained only on what the model itself would generate: each
assistant turn's content and the end-of-turn token that stops generation (`<|im_end|>`
in ChatML), not the role header before it nor the separator the template writes after
it. Assistant turns with weight 0 are context only. A prompt/completion example is the
prompt encoded as /v1/completions encodes it, then the completion and EOS, trained on.

Assistant turns are located by rendering the conversation cut just before each of them
(with the generation prompt) and just after: both renderings must be text prefixes of
the whole conversation, or the template is not prefix-stable and the turn cannot be told
apart. The text is then tokenized piece by piece at those cuts. That puts a token
boundary exactly where generation starts at inference (the prompt ends with the header,
the model emits the content), and keeps BPE from merging the header's newline with
content that starts with whitespace into a token that belongs to neither.

Every problem names its 1-based line; up to `MAX_REPORTED_ERRORS` are collected into one
message, so a user can fix a file in one round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from pydantic import TypeAdapter, ValidationError
from transformers import PreTrainedTokenizerBase

from server.protocol import Tool, lone_surrogate_path
from server.tools.history import template_tool_call
from server.tools.rendering import render_chat

MAX_REPORTED_ERRORS = 10
CHAT = "chat"
PROMPT_COMPLETION = "prompt/completion"
ROLES = ("system", "user", "assistant", "tool")
CHAT_KEYS = ("messages", "tools", "parallel_tool_calls")
# weight is refused on other roles with its own message, below.
MESSAGE_KEYS = ("role", "content", "weight", "tool_calls", "tool_call_id")
ROLE_ONLY_KEYS = {"tool_calls": "assistant", "tool_call_id": "tool"}
TOOL_CALL_KEYS = ("id", "type", "function")
FUNCTION_KEYS = ("name", "arguments")
PROMPT_KEYS = ("prompt", "completion")
_TOOLS = TypeAdapter(list[Tool])


class TrainingDataError(ValueError):
    """The file cannot be trained on; the message names the line(s) and the problem(s)."""


@dataclass(frozen=True)
class RenderedExample:
    token_ids: list[int]
    # target[t]: token t is trained on (predicted from tokens < t); target[0] is always False.
    target: list[bool]


@dataclass(frozen=True)
class DataSummary:
    examples: int
    tokens: int
    target_tokens: int


def summarize(examples: list[RenderedExample]) -> DataSummary:
    return DataSummary(
        examples=len(examples),
        tokens=sum(len(e.token_ids) for e in examples),
        target_tokens=sum(sum(e.target) for e in examples),
    )


def render_training_file(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[RenderedExample]:
    """Every example of the file, in file order; raises TrainingDataError naming the bad lines."""
    renderer = _Renderer(tokenizer, max_seq_len)
    examples, problems = [], []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                examples.append(renderer.line(number, raw))
            except TrainingDataError as exc:
                problems.append(f"line {number}: {exc}")
                if len(problems) == MAX_REPORTED_ERRORS:
                    problems.append(f"(checking stopped at the {MAX_REPORTED_ERRORS}th problem)")
                    break
    if problems:
        raise TrainingDataError("; ".join(problems))
    if not examples:
        raise TrainingDataError("the training file has no examples")
    return examples


class _Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        # A turn's trained tokens end at its last special token: the end-of-turn marker.
        self.special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.format: tuple[str, int] | None = None  # the file's format, and the line that set it

    def line(self, number: int, raw: bytes) -> RenderedExample:
        value = _parse_json(raw)
        line_format = _format_of(value)
        if self.format is None:
            self.format = (line_format, number)
        elif line_format != self.format[0]:
            first_format, first_line = self.format
            raise TrainingDataError(
                f"a {line_format} example, but line {first_line} is a {first_format} example; "
                "a file must use one format"
            )
        example = self._chat(value) if line_format == CHAT else self._prompt_completion(value)
        if len(example.token_ids) > self.max_seq_len:
            raise TrainingDataError(
                f"the example is {len(example.token_ids)} tokens long, more than max_seq_len ({self.max_seq_len})"
            )
        return example

    def _chat(self, value: dict) -> RenderedExample:
        _check_keys(value, ("messages",), CHAT_KEYS, "the example")
        tools = _tools(value)
        messages, conversation = _chat_messages(value, tools)
        if not self.tokenizer.chat_template:
            raise TrainingDataError("this model has no chat template; use the prompt/completion format")
        whole = self._template(conversation, tools, generation_prompt=False)
        pieces: list[tuple[str, bool]] = []  # the rendering, cut around assistant turns; trained or not
        cut = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._cut(conversation[:i], tools, True, whole, cut, i)
            end = self._cut(conversation[: i + 1], tools, False, whole, start, i)
            pieces += [(whole[cut:start], False), (whole[start:end], message.get("weight", 1) == 1)]
            cut = end
        pieces.append((whole[cut:], False))

        token_ids, target = [], []
        for text, trained in pieces:
            # No added specials: the template wrote every special token the model expects.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            token_ids += ids
            target += self._turn_target(ids) if trained else [False] * len(ids)
        if target:
            target[0] = False  # nothing precedes it to predict it from
        return RenderedExample(token_ids, target)

    def _cut(self, conversation: list[dict], tools: list[dict] | None, generation_prompt: bool, whole: str,
             not_before: int, index: int) -> int:
        """Where the rendering of `conversation` ends inside `whole`."""
        text = self._template(conversation, tools, generation_prompt)
        if len(text) < not_before or not whole.startswith(text):
            raise TrainingDataError(
                f"cannot locate the tokens of messages[{index}]: the model's chat template renders the "
                "conversation up to that message differently from the start of the whole conversation "
                "(the template is not prefix-stable)"
            )
        return len(text)

    def _template(self, conversation: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        try:
            return render_chat(self.tokenizer, conversation, tools, add_generation_prompt=generation_prompt)
        except TemplateError as exc:
            raise TrainingDataError(f"the model's chat template refused the conversation: {exc}") from None

    def _turn_target(self, ids: list[int]) -> list[bool]:
        """An assistant turn's mask: up to its end-of-turn token, not the separator after it."""
        ends = [t for t, token in enumerate(ids) if token in self.special_ids]
        trained = ends[-1] + 1 if ends else len(ids)
        return [True] * trained + [False] * (len(ids) - trained)

    def _prompt_completion(self, value: dict) -> RenderedExample:
        _check_keys(value, PROMPT_KEYS, PROMPT_KEYS, "the example")
        for key in PROMPT_KEYS:
            if not isinstance(value[key], str):
                raise TrainingDataError(f"{key} must be a string, not {_json_type(value[key])}")
        prompt = self.tokenizer.encode(value["prompt"])
        if not prompt:
            raise TrainingDataError("prompt must not be empty: the completion's first token needs something before it")
        completion = self.tokenizer.encode(value["completion"], add_special_tokens=False)
        completion.append(self.tokenizer.eos_token_id)  # so the model learns where to stop
        return RenderedExample(prompt + completion, [False] * len(prompt) + [True] * len(completion))


def _parse_json(raw: bytes) -> object:
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise TrainingDataError("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    # A \uD800-style escape may spell a lone surrogate, which no tokenizer takes.
    path = lone_surrogate_path(value)
    if path is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        where = where.encode("utf-8", "backslashreplace").decode()
        raise TrainingDataError(f"{where or 'the line'} holds a lone surrogate (invalid Unicode text)")
    return value


def _format_of(value: object) -> str:
    if not isinstance(value, dict):
        raise TrainingDataError(f"an example must be a JSON object, not {_json_type(value)}")
    if "messages" in value:
        return CHAT
    if "prompt" in value or "completion" in value:
        return PROMPT_COMPLETION
    raise TrainingDataError(
        'expected a chat example {"messages": [...]} or a prompt/completion example {"prompt": ..., "completion": ...}'
    )


def _tools(value: dict) -> list[dict] | None:
    """The example's tools, checked as /v1/chat/completions checks them; None without."""
    if "parallel_tool_calls" in value and type(value["parallel_tool_calls"]) is not bool:
        raise TrainingDataError(
            f"parallel_tool_calls must be true or false, not {json.dumps(value['parallel_tool_calls'])}"
        )
    if "tools" not in value:
        return None
    try:
        tools = _TOOLS.validate_python(value["tools"])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "tools" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        raise TrainingDataError(f"{where}: {error['msg']}") from None
    if not tools:
        raise TrainingDataError("tools must be a non-empty array")
    return [tool.model_dump(exclude_none=True) for tool in tools]


def _chat_messages(value: dict, tools: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """The checked messages, and the conversation the chat template takes."""
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError("messages must be a non-empty array")
    tool_names = {tool["function"]["name"] for tool in tools or []}
    one_call_a_turn = value.get("parallel_tool_calls") is False
    called: dict[str, str] = {}  # tool call id -> function name, so far
    conversation = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TrainingDataError(f"{where} must be an object, not {_json_type(message)}")
        role = message.get("role")
        has_calls = role == "assistant" and "tool_calls" in message
        required = ("role",) if has_calls else ("role", "content", "tool_call_id")[: 3 if role == "tool" else 2]
        _check_keys(message, required, MESSAGE_KEYS, where)
        if role not in ROLES:
            raise TrainingDataError(f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        for key, owner in ROLE_ONLY_KEYS.items():
            if key in message and role != owner:
                raise TrainingDataError(f"{where}.{key} is only allowed on {owner} messages")
        if i == 0 and role == "assistant":
            # Nothing would prompt it, and templates cannot render the empty conversation before it.
            raise TrainingDataError("messages[0] is an assistant message; a conversation starts with system or user")
        content = message.get("content")
        if not isinstance(content, str) and not (has_calls and content is None):
            raise TrainingDataError(f"{where}.content must be a string, not {_json_type(content)}")
        turn = {"role": role, "content": content or ""}
        if has_calls:
            turn["tool_calls"] = _tool_calls(message["tool_calls"], where, tool_names, one_call_a_turn, called)
        if role == "tool":
            call_id = message["tool_call_id"]
            if not isinstance(call_id, str) or call_id not in called:
                raise TrainingDataError(
                    f"{where}.tool_call_id {json.dumps(call_id)} answers no tool call of an earlier assistant message"
                )
            turn.update(tool_call_id=call_id, name=called[call_id])
        conversation.append(turn)
        if "weight" in message:
            if role != "assistant":
                raise TrainingDataError(f"{where}.weight is only allowed on assistant messages")
            # `type` rather than isinstance: JSON true is a bool, which Python counts as an int.
            if type(message["weight"]) is not int or message["weight"] not in (0, 1):
                raise TrainingDataError(f"{where}.weight must be 0 or 1, not {json.dumps(message['weight'])}")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise TrainingDataError("the conversation has no assistant message to train on")
    if all(m.get("weight", 1) == 0 for m in assistant):
        raise TrainingDataError("every assistant message has weight 0, so there is nothing to train on")
    return messages, conversation


def _tool_calls(
    calls: object, where: str, tool_names: set[str], one_call_a_turn: bool, called: dict[str, str]
) -> list[dict]:
    """An assistant message's tool_calls, checked, as the chat template takes them."""
    if not isinstance(calls, list) or not calls:
        raise TrainingDataError(f"{where}.tool_calls must be a non-empty array")
    if one_call_a_turn and len(calls) > 1:
        raise TrainingDataError(f"{where} makes {len(calls)} tool calls, but parallel_tool_calls is false")
    rendered = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise TrainingDataError(f"{at} must be an object, not {_json_type(call)}")
        _check_keys(call, TOOL_CALL_KEYS, TOOL_CALL_KEYS, at)
        if not isinstance(call["id"], str) or not call["id"]:
            raise TrainingDataError(f"{at}.id must be a non-empty string")
        if call["type"] != "function":
            raise TrainingDataError(f'{at}.type must be "function", not {json.dumps(call["type"])}')
        function = call["function"]
        if not isinstance(function, dict):
            raise TrainingDataError(f"{at}.function must be an object, not {_json_type(function)}")
        _check_keys(function, FUNCTION_KEYS, FUNCTION_KEYS, f"{at}.function")
        name, arguments = function["name"], function["arguments"]
        if name not in tool_names:
            raise TrainingDataError(f"{at}.function.name {json.dumps(name)} is not among the example's tools")
        if not isinstance(arguments, str):
            raise TrainingDataError(f"{at}.function.arguments must be a string of JSON, not {_json_type(arguments)}")
        try:
            rendered.append(template_tool_call(call["id"], name, arguments))
        except ValueError as exc:
            raise TrainingDataError(f"{at}.function.arguments: {exc}") from None
        called[call["id"]] = name
    return rendered


def _check_keys(value: dict, required: tuple[str, ...], allowed: tuple[str, ...], where: str) -> None:
    missing = [key for key in required if key not in value]
    if missing:
        raise TrainingDataError(f"{where} is missing {', '.join(map(repr, missing))}")
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise TrainingDataError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return names[type(value)]
