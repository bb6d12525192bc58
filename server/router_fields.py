"""Fields that SGLang-lineage routers add to every request they forward.

vllm-router (and sglang-router) parse a completion or chat request into their own
struct and serialize it again with SGLang's sampling fields set to their defaults
(`no_stop_trim: false`, `skip_special_tokens: true`, ...), whatever the client sent.
Behind such a router every request carries them. The server takes each one when its
value asks for what coserve does anyway; any other value stays in the body and is
rejected like every unknown field (400 naming it), so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any

# field -> the value that asks for coserve's own behaviour
ROUTER_FIELD_NO_OPS: dict[str, bool] = {
    "no_stop_trim": False,  # a stop string is cut from the text
    "skip_special_tokens": True,  # the detokenizer leaves special tokens out
    "return_hidden_states": False,
    "continue_final_message": False,  # chat: the template opens a new assistant turn
    # No reasoning parser: a model's reasoning, if any, is part of `content`, which
    # these three (true: reasoning included, separated, streamed) do not change here.
    "include_reasoning": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
}


def without_router_no_ops(body: Any) -> Any:
    """The request body without the router-added fields that hold their no-op value."""
    if not isinstance(body, dict):
        return body
    return {
        key: value for key, value in body.items()
        if not (key in ROUTER_FIELD_NO_OPS and value is ROUTER_FIELD_NO_OPS[key])
    }
