"""Tool calling on /v1/chat/completions (and in fine-tuning data).

    markup      the text form of a call in the model's output (Hermes/Qwen style)
    schema      a function's `parameters` checked as a JSON schema
    policy      tools + tool_choice + parallel_tool_calls -> what the output may hold
    grammar     the policy as an xgrammar structural tag the engine enforces
    history     an assistant tool call of the history, as templates take it
    rendering   tools and tool history through the chat template, or the fallback
    fallback    the fallback: a system-prompt section and calls written as markup
    parser      model output -> content and tool calls, incrementally for streaming
"""
