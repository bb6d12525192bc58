"""tools + tool_choice + parallel_tool_calls -> what the model's output may hold.

Cross-field checks live here (pydantic checked each field's shape in server/protocol.py),
each a 400 naming the parameter at fault:

- tool_choice or parallel_tool_calls without tools, or a tool_choice naming a function
  that is not among them;
- two tools of one name;
- response_format / structured_outputs beside tools the model may call: both would
  constrain the same output, and one grammar cannot serve both meanings;
- the legacy `functions` / `function_call` (deprecated by OpenAI since 2023): refused
  rather than mapped onto tools, because a client that sends them reads the answer from
  `message.function_call`, which this server does not write.

tool_choice "none" keeps the tools out of the prompt and the output unparsed, so the
request is an ordinary chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server import errors
from server.protocol import ChatCompletionRequest, FunctionDefinition, NamedToolChoice


@dataclass(frozen=True)
class ToolPolicy:
    tools: tuple[FunctionDefinition, ...]  # every tool, shown to the model
    # auto: text, calls or both; required: one or more calls only; named: one call of `callable`.
    choice: Literal["auto", "required", "named"]
    callable: tuple[FunctionDefinition, ...]  # the functions the output may call
    parallel: bool  # more than one call allowed


def tool_policy(body: ChatCompletionRequest) -> ToolPolicy | None:
    """The request's policy; None when the model is not to call tools."""
    for legacy in ("functions", "function_call"):
        if getattr(body, legacy) is not None:
            raise errors.bad_request(f"{legacy} is deprecated and not supported; use tools and tool_choice", legacy)
    if body.tools is None:
        for field in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, field) is not None:
                raise errors.bad_request(f"{field} is only allowed when tools are given", field)
        return None
    functions = tuple(tool.function for tool in body.tools)
    _check_unique_names(functions)
    choice = body.tool_choice or "auto"
    if choice == "none":
        return None
    for constraint in ("response_format", "structured_outputs"):
        value = getattr(body, constraint)
        if value is not None and not (constraint == "response_format" and value.type == "text"):
            raise errors.bad_request(
                f"{constraint} cannot be combined with tools the model may call (tool_choice {_describe(choice)}); "
                'send tool_choice "none" to constrain the answer',
                constraint,
            )
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        named = [f for f in functions if f.name == choice.function.name]
        if not named:
            raise errors.bad_request(
                f"tool_choice names the function {choice.function.name!r}, which is not among tools", "tool_choice"
            )
        return ToolPolicy(functions, "named", tuple(named), parallel=False)
    return ToolPolicy(functions, choice, functions, parallel)


def _check_unique_names(functions: tuple[FunctionDefinition, ...]) -> None:
    seen = set()
    for i, function in enumerate(functions):
        if function.name in seen:
            raise errors.bad_request(f"tools has two functions named {function.name!r}", f"tools.{i}.function.name")
        seen.add(function.name)


def _describe(choice: str | NamedToolChoice) -> str:
    return f"naming {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else repr(choice)
