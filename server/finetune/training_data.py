"""Uploaded JSONL training files -> token ids and loss masks for the engine.

Two formats, as OpenAI accepts them; the file's first example picks one and every line
must then use it:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}
    {"prompt": "...", "completion": "..."}

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
from transformers import PreTrainedTokenizerBase

MAX_REPORTED_ERRORS = 10
CHAT = "chat"
PROMPT_COMPLETION = "prompt/completion"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight")
PROMPT_KEYS = ("prompt", "completion")


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
        messages = _chat_messages(value)
        if not self.tokenizer.chat_template:
            raise TrainingDataError("this model has no chat template; use the prompt/completion format")
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        whole = self._template(conversation, generation_prompt=False)
        pieces: list[tuple[str, bool]] = []  # the rendering, cut around assistant turns; trained or not
        cut = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._cut(conversation[:i], True, whole, cut, i)
            end = self._cut(conversation[: i + 1], False, whole, start, i)
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

    def _cut(self, conversation: list[dict], generation_prompt: bool, whole: str, not_before: int, index: int) -> int:
        """Where the rendering of `conversation` ends inside `whole`."""
        text = self._template(conversation, generation_prompt)
        if len(text) < not_before or not whole.startswith(text):
            raise TrainingDataError(
                f"cannot locate the tokens of messages[{index}]: the model's chat template renders the "
                "conversation up to that message differently from the start of the whole conversation "
                "(the template is not prefix-stable)"
            )
        return len(text)

    def _template(self, conversation: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=generation_prompt, tokenize=False
            )
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
        return json.loads(raw)
    except UnicodeDecodeError:
        raise TrainingDataError("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None


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


def _chat_messages(value: dict) -> list[dict]:
    _check_keys(value, ("messages",), ("messages",), "the example")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError("messages must be a non-empty array")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TrainingDataError(f"{where} must be an object, not {_json_type(message)}")
        _check_keys(message, ("role", "content"), MESSAGE_KEYS, where)
        role = message["role"]
        if role not in ROLES:
            raise TrainingDataError(f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        if i == 0 and role == "assistant":
            # Nothing would prompt it, and templates cannot render the empty conversation before it.
            raise TrainingDataError("messages[0] is an assistant message; a conversation starts with system or user")
        if not isinstance(message["content"], str):
            raise TrainingDataError(f"{where}.content must be a string, not {_json_type(message['content'])}")
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
    return messages


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
