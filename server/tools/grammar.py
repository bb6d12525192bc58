"""A ToolPolicy as the grammar the engine enforces (an xgrammar structural tag).

Each callable function is a tag: its fixed head `<tool_call>\\n{"name": "<name>",
"arguments": `, then a JSON object following the function's `parameters`, then its fixed
tail `}\\n</tool_call>` (server/tools/markup.py). So the name is always one of the
functions and the arguments always parse and match the schema.

- required: one or more calls (one without parallel_tool_calls), nothing else;
- named: exactly one call of that function;
- auto: free text, and wherever the text starts `<tool_call>` a complete call must
  follow (more text and calls may follow it unless parallel_tool_calls is false, in
  which case the output ends with the first call).

Whitespace inside the arguments is bounded to one character between tokens: a small
model may otherwise spend its tokens on the blank space JSON allows.
"""

from __future__ import annotations

import json

from engine.grammar.compiler import GrammarError, parse
from engine.messages import StructuredOutput
from server import errors
from server.structured import check_enforceable
from server.tools import markup
from server.tools.policy import ToolPolicy
from server.tools.schema import NO_PARAMETERS

MAX_WHITESPACE = 1


def tool_grammar(policy: ToolPolicy) -> StructuredOutput:
    """The policy's grammar, checked: a parameters schema xgrammar cannot compile (or
    that no value satisfies) is a 400 naming that tool's parameters."""
    for i, function in enumerate(policy.tools):
        _check_parameters(function.parameters, f"tools.{i}.function.parameters")
    tags = [_call_tag(f.name, f.parameters or NO_PARAMETERS) for f in policy.callable]
    if policy.choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [markup.CALL_BEGIN], "tags": tags,
               "at_least_one": False, "stop_after_first": not policy.parallel}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": markup.CALL_SEPARATOR,
               "at_least_one": True, "stop_after_first": not policy.parallel}
    spec = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))
    try:
        parse(spec)
    except GrammarError as exc:
        raise errors.bad_request(f"the tools cannot be turned into a grammar: {exc}", "tools") from None
    return spec


def _call_tag(name: str, parameters: dict) -> dict:
    return {
        "type": "tag",
        "begin": markup.call_head(name),
        "content": {"type": "json_schema", "json_schema": parameters, "max_whitespace_cnt": MAX_WHITESPACE},
        "end": markup.CALL_TAIL,
    }


def _check_parameters(parameters: dict | None, param: str) -> None:
    if parameters is None:
        return
    try:
        check_enforceable(parameters)
        parse(StructuredOutput("json", json.dumps(parameters)))
    except GrammarError as exc:
        raise errors.bad_request(f"Invalid JSON schema for {param}: {exc}", param) from None
