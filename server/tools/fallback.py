"""Tools for a chat template that has no tool support: a documented fallback prompt.

The conversation is rewritten into the roles every template knows:

- a system-prompt section (appended to the first system message, or a system message of
  its own) listing each tool's JSON schema and the call format (server/tools/markup.py);
- an assistant message's tool_calls become call blocks after its content;
- tool results become a user turn of <tool_response> blocks, consecutive results in one
  turn, in the order of the calls.

The rewrite keeps every prefix of the conversation a prefix of the rendering (the tools
section sits at the start), which fine-tuning data relies on to find assistant turns.
"""

from __future__ import annotations

import json

from server.tools import markup

TOOLS_SECTION = """# Tools

You may call one or more of these functions to help with the user's request. Each is described by a JSON schema, one per line:
<tools>
{schemas}
</tools>

To call a function, write its name and arguments as one JSON object between tags:
{example}
Write several such blocks to make several calls. Each call's result will come back between {response_begin} and {response_end} tags."""


def tools_section(tools: list[dict]) -> str:
    return TOOLS_SECTION.format(
        schemas="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
        example=f'{markup.CALL_BEGIN}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{markup.CALL_END}',
        response_begin=markup.RESPONSE_BEGIN,
        response_end=markup.RESPONSE_END,
    )


def fallback_conversation(conversation: list[dict], tools: list[dict] | None) -> list[dict]:
    """conversation: template messages (role, content, name, tool_calls with arguments as
    objects, tool_call_id) -> messages of role, content and name only."""
    rewritten: list[dict] = []
    after_tool_result = False
    for message in conversation:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            block = markup.response_block(content)
            if after_tool_result:
                rewritten[-1]["content"] += "\n" + block
            else:
                rewritten.append({"role": "user", "content": block})
            after_tool_result = True
            continue
        after_tool_result = False
        if role == "assistant" and message.get("tool_calls"):
            calls = markup.CALL_SEPARATOR.join(
                markup.call_block(call["function"]["name"], call["function"]["arguments"])
                for call in message["tool_calls"]
            )
            content = f"{content}\n{calls}" if content else calls
        rewritten.append({"role": role, "content": content, **({"name": message["name"]} if "name" in message else {})})
    if tools:
        section = tools_section(tools)
        if rewritten and rewritten[0]["role"] == "system":
            rewritten[0]["content"] += "\n\n" + section
        else:
            rewritten.insert(0, {"role": "system", "content": section})
    return rewritten
