"""A conversation, with its tools, through the model's chat template.

Whether the template supports tools is read from its source: one that reads the
`tools` variable and writes messages' `tool_calls` renders them itself (transformers
passes both through); any other gets the fallback of server/tools/fallback.py. Serving
(server/prompts.py) and fine-tuning data (server/finetune/training_data.py) both render
here, so what a model is trained on is what it is served with.
"""

from __future__ import annotations

import functools
import re

from transformers import PreTrainedTokenizerBase

from server.tools.fallback import fallback_conversation


@functools.lru_cache(maxsize=8)
def template_supports_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None and "tool_calls" in template


def render_chat(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict], tools: list[dict] | None, add_generation_prompt: bool
) -> str:
    """conversation: messages as chat templates take them (role, content; an assistant's
    tool_calls with arguments as objects; a tool message's tool_call_id and name). tools:
    OpenAI's tool objects, or None. Raises what the template raises."""
    if not template_supports_tools(tokenizer.get_chat_template(tools=tools)):
        conversation, tools = fallback_conversation(conversation, tools), None
    return tokenizer.apply_chat_template(
        conversation, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
