"""From request bodies to prompt token ids, and the context-length check.

Tokenization happens in the server process so the engine never sees text, and so
that a prompt that cannot fit is refused with a 400 before it costs the engine
anything.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from server import errors
from server.protocol import ChatMessage
from server.tools.history import template_tool_call
from server.tools.rendering import render_chat


class PromptEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """A completions `prompt` in any of its four shapes -> one token list per prompt."""
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [self.encode(p) for p in prompt]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            self.check_token_ids(ids, "prompt")
            if not ids:
                raise errors.bad_request("prompt must not be empty", "prompt")
        return prompts

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise errors.bad_request(f"token id {bad} is out of range (vocabulary size {self.vocab_size})", param)

    def chat_prompt(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
        """tools: OpenAI's tool objects to show the model, or None."""
        if not self.tokenizer.chat_template:
            raise errors.bad_request("this model has no chat template; use /v1/completions", "messages")
        called: dict[str, str] = {}  # tool call id -> function name, from the assistant messages so far
        conversation = [_template_message(i, m, called) for i, m in enumerate(messages)]
        # Rendered to text, then encoded without extra specials: the template already
        # wrote every special token the model expects.
        text = render_chat(self.tokenizer, conversation, tools, add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)

    def fit_max_tokens(self, prompt_len: int, max_tokens: int | None, prompt_param: str) -> int:
        """The completion budget: as asked if it fits, the rest of the context if None."""
        room = self.max_model_len - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise errors.context_length_exceeded(self.max_model_len, prompt_len, max_tokens, prompt_param)
        return room if max_tokens is None else max_tokens


def _template_message(index: int, message: ChatMessage, called: dict[str, str]) -> dict:
    """The message as chat templates take it; `called` collects the assistant's tool call
    ids, which a later tool message must answer."""
    param = f"messages.{index}"
    if unsupported := message.unsupported_fields():
        field = f"{param}.{unsupported[0]}"
        raise errors.bad_request(f"{field} is not supported by this server", field)
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                raise errors.bad_request(
                    f"content part type {part.type!r} is not supported; only text parts are", f"{param}.content.{j}"
                )
        content = "\n".join(part.text for part in message.content)
    else:
        content = message.content or ""
    # Templates know system/user/assistant; OpenAI's newer "developer" role means system.
    role = "system" if message.role == "developer" else message.role
    rendered = {"role": role, "content": content}
    if message.name is not None and role != "tool":
        rendered["name"] = message.name  # a participant's name: the template's to show (or not)
    if message.tool_calls and role != "assistant":
        raise errors.bad_request("only assistant messages may have tool_calls", f"{param}.tool_calls")
    if message.tool_call_id is not None and role != "tool":
        raise errors.bad_request("only tool messages may have a tool_call_id", f"{param}.tool_call_id")
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            where = f"{param}.tool_calls.{j}.function.arguments"
            try:
                calls.append(template_tool_call(call.id, call.function.name, call.function.arguments))
            except ValueError as exc:
                raise errors.bad_request(f"{where}: {exc}", where) from None
            called[call.id] = call.function.name
        rendered["tool_calls"] = calls
    if role == "tool":
        if message.tool_call_id not in called:
            raise errors.bad_request(
                "a tool message must answer a tool call of an earlier assistant message (its tool_call_id)",
                f"{param}.tool_call_id",
            )
        rendered.update(tool_call_id=message.tool_call_id, name=called[message.tool_call_id])
    return rendered
