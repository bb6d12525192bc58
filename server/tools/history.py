"""An assistant's tool call from a conversation's history, as chat templates take it.

OpenAI sends a call's arguments as JSON text; templates (and the fallback, which writes
them back as JSON) want the object, so text that is not a JSON object is refused here,
before it could reach a prompt as something the model never wrote.
"""

from __future__ import annotations

import json


def template_tool_call(call_id: str, name: str, arguments: str) -> dict:
    """Raises ValueError when arguments is not a JSON object."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    try:  # a \uD800-style escape may spell a lone surrogate, which no tokenizer takes
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate (invalid Unicode text)") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": value}}
