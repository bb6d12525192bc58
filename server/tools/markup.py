"""How a tool call is written in the model's output, and in the history shown to it.

The Hermes/Qwen 2.5 form, which many open models were trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Calls follow each other separated by a newline; text may precede them. A tool's result
goes back inside <tool_response>...</tool_response>. The grammar (server/tools/grammar.py)
makes generated calls take exactly the shape `call_block` writes, name first, so that
what the model reads in its history and what it is held to when writing are the same.
"""

from __future__ import annotations

import json

CALL_BEGIN = "<tool_call>"
CALL_END = "</tool_call>"
RESPONSE_BEGIN = "<tool_response>"
RESPONSE_END = "</tool_response>"
CALL_SEPARATOR = "\n"


def call_head(name: str) -> str:
    """A call's text up to its arguments object."""
    return f'{CALL_BEGIN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


# What closes a call after its arguments object: the outer object's brace, then the tag.
CALL_TAIL = "}\n" + CALL_END


def call_block(name: str, arguments: dict) -> str:
    return call_head(name) + json.dumps(arguments, ensure_ascii=False) + CALL_TAIL


def response_block(content: str) -> str:
    return f"{RESPONSE_BEGIN}\n{content}\n{RESPONSE_END}"
