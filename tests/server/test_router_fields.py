"""The fields vllm-router adds to every request it forwards: taken at their no-op
values, rejected by name at any other."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.protocol import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.unit

# What vllm-router 0.1.17 forwarded for {"model", "prompt"} and {"model", "messages", "max_tokens"}.
COMPLETION_AS_FORWARDED = {
    "model": "m", "prompt": "hi", "stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
    "skip_special_tokens": True, "return_hidden_states": False,
}
CHAT_AS_FORWARDED = {
    "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False, "max_tokens": 1,
    "logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
    "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
    "return_hidden_states": False, "include_reasoning": True,
}


def test_forwarded_requests_validate_as_the_client_sent_them():
    completion = CompletionRequest.model_validate(COMPLETION_AS_FORWARDED)
    assert completion == CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    chat = ChatCompletionRequest.model_validate(CHAT_AS_FORWARDED)
    assert chat == ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


@pytest.mark.parametrize("field, value", [("skip_special_tokens", False), ("no_stop_trim", True),
                                          ("return_hidden_states", True), ("continue_final_message", True),
                                          ("separate_reasoning", False), ("skip_special_tokens", 1)])
def test_a_value_asking_for_something_else_is_rejected_by_name(field, value):
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(CHAT_AS_FORWARDED | {field: value})
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]
