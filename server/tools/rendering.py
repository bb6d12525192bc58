"""A conversation, with its tools, through the model's chat template.

The template renders tools itself when it supports them and writes an assistant's calls
the way the grammar holds generated calls to (the Hermes/Qwen markup of
server/tools/markup.py), as Qwen 2.5's and Hermes' templates do: then the model reads
its own prompt format and writes calls in the form its template shows it. Any other
template, one without tool support or one that writes calls in another form (Llama 3.1's
bare JSON, Mistral's [TOOL_CALLS]), gets the fallback of server/tools/fallback.py, so
that the calls in the prompt and the calls the grammar allows always look alike.

Whether a template qualifies is decided once per template: one that mentions `tools`
and `tool_calls` renders a probe conversation with one call, which must come out as
markup. Serving (server/prompts.py) and fine-tuning data
(server/finetune/training_data.py) both render here, so what a model is trained on is
what it is served with.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from server.tools import markup
from server.tools.fallback import fallback_conversation

_PROBE_NAME, _PROBE_ARGUMENTS = "probe_function", {"value": 1}
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _PROBE_NAME, "description": "A probe",
    "parameters": {"type": "object", "properties": {"value": {"type": "integer"}}, "required": ["value"]}}}]
_PROBE = [
    {"role": "user", "content": "Probe."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe", "type": "function", "function": {"name": _PROBE_NAME, "arguments": _PROBE_ARGUMENTS}}]},
    {"role": "tool", "content": "1", "tool_call_id": "call_probe", "name": _PROBE_NAME},
]

_renders_tools: dict[str, bool] = {}  # template source -> whether it renders tools itself


def template_mentions_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None and "tool_calls" in template


def template_renders_tools(tokenizer: PreTrainedTokenizerBase, template: str) -> bool:
    """Whether `template` shows tools itself and writes calls as the markup."""
    known = _renders_tools.get(template)
    if known is None:
        known = template_mentions_tools(template) and _writes_markup(tokenizer, template)
        _renders_tools[template] = known
    return known


def _writes_markup(tokenizer: PreTrainedTokenizerBase, template: str) -> bool:
    try:
        text = tokenizer.apply_chat_template(
            _PROBE, tools=_PROBE_TOOLS, chat_template=template, add_generation_prompt=False, tokenize=False
        )
    except Exception:  # a template that refuses the probe's shape cannot be trusted with tools
        return False
    return markup.call_block(_PROBE_NAME, _PROBE_ARGUMENTS) in text


def render_chat(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict], tools: list[dict] | None, add_generation_prompt: bool
) -> str:
    """conversation: messages as chat templates take them (role, content; an assistant's
    tool_calls with arguments as objects; a tool message's tool_call_id and name). tools:
    OpenAI's tool objects, or None. Raises what the template raises."""
    template = tokenizer.get_chat_template(tools=tools)
    if not template_renders_tools(tokenizer, template):
        conversation, tools = fallback_conversation(conversation, tools), None
        template = tokenizer.get_chat_template()
    return tokenizer.apply_chat_template(
        conversation, tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
