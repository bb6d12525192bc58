"""POST /v1/chat/completions: messages rendered by the model's chat template.

With tools the model may call (server/tools/), the prompt shows them, a grammar holds
the output to the policy, and each choice's text is parsed into content and tool calls:
whole for a response, piece by piece for a stream, by the same parser.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from server import errors
from server.context import ServerContext, get_context
from server.disconnect import cancel_on_disconnect
from server.generation import (
    ChoiceDelta,
    Sequence,
    TokenLogprob,
    make_sequences,
    start_generation,
)
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from server.routes.sampling import kv_ttl_seconds, new_request_id, sampling_params, usage
from server.sse import STREAMED, event, sse_response
from server.tools.grammar import tool_grammar
from server.tools.parser import ParsedDelta, ToolCallParser, parse_tool_calls
from server.tools.policy import ToolPolicy, tool_policy

router = APIRouter()


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    ctx = get_context(request)
    lora_name = ctx.lora_name(request, body.model)
    ctx.check_engine()
    _reject_unsupported(body)
    policy = tool_policy(body)
    grammar = tool_grammar(policy) if policy is not None else None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if policy is not None else None
    prompt = ctx.prompts.chat_prompt(body.messages, tools)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(
        ctx,
        body,
        max_tokens=ctx.prompts.fit_max_tokens(len(prompt), requested, "messages"),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        grammar=grammar,
    )
    request_id = new_request_id("chatcmpl")
    sequences = make_sequences(ctx.tokenizer, request_id, [(prompt, params)], body.n or 1, body.stop_strings, lora_name, body.slo,
                               kv_ttl_seconds(ctx, body))
    chat = _Chat(ctx, body, request_id, prompt, sequences, policy)
    deltas = start_generation(ctx.engine, ctx.texts, sequences)
    if body.stream:
        return sse_response(chat.events(deltas))
    return await cancel_on_disconnect(request, chat.collect(deltas))


class _Chat:
    def __init__(
        self,
        ctx: ServerContext,
        body: ChatCompletionRequest,
        request_id: str,
        prompt: list[int],
        sequences: list[Sequence],
        policy: ToolPolicy | None,
    ):
        self.body = body
        self.policy = policy
        self.prompt = prompt
        self.sequences = sequences
        self.id = request_id
        self.created = int(time.time())
        self.model = body.model or ctx.served_model_name

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return ChatLogprobs(content=[_chat_logprob(e) for e in entries]) if self.body.logprobs else None

    async def collect(self, deltas: AsyncIterator[ChoiceDelta]) -> ChatCompletionResponse:
        async with aclosing(deltas):
            async for _ in deltas:
                pass
        choices = [
            ChatChoice(index=seq.index, logprobs=self._logprobs(seq.logprobs), **self._answer(seq))
            for seq in self.sequences
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage([self.prompt], self.sequences)
        )

    def _answer(self, seq: Sequence) -> dict:
        """The message and finish_reason of a finished choice."""
        if self.policy is None:
            return {"message": AssistantMessage(content=seq.text), "finish_reason": seq.finish_reason}
        parsed = parse_tool_calls(seq.text)
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
        return {
            "message": AssistantMessage(content=parsed.content, tool_calls=calls or None),
            "finish_reason": _finish_reason(seq.finish_reason, bool(calls)),
        }

    async def events(self, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        parsers = {seq.index: ToolCallParser() for seq in self.sequences} if self.policy is not None else {}
        async with aclosing(deltas):
            # The role comes first and alone, as OpenAI streams it.
            for seq in self.sequences:
                yield event(self._chunk(ChatChunkChoice(index=seq.index, delta=ChatDelta(role="assistant", content=""))))
            async for delta in deltas:
                parser = parsers.get(delta.index)
                if parser is None:
                    pieces = [ChatDelta(content=delta.text)] if delta.text else []
                    finish_reason = delta.finish_reason
                else:
                    pieces = _chat_deltas(parser.feed(delta.text))
                    if delta.finish_reason is not None:
                        pieces += _chat_deltas(parser.finish())
                    finish_reason = _finish_reason(delta.finish_reason, bool(parser.calls))
                if not pieces and (finish_reason or (self.body.logprobs and delta.logprobs)):
                    pieces = [ChatDelta()]
                for i, piece in enumerate(pieces):
                    # The token logprobs ride on a delta's first chunk, the finish on its last.
                    choice = ChatChunkChoice(
                        index=delta.index,
                        delta=piece,
                        logprobs=self._logprobs(delta.logprobs) if i == 0 else None,
                        finish_reason=finish_reason if i == len(pieces) - 1 else None,
                    )
                    yield event(self._chunk(choice))
        if self.body.include_usage_chunk:
            yield event(self._chunk(None).model_copy(update={"usage": usage([self.prompt], self.sequences)}))

    def _chunk(self, choice: ChatChunkChoice | None) -> ChatCompletionChunk:
        choices = [choice] if choice is not None else []
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)


def _finish_reason(finish_reason: str | None, made_calls: bool) -> str | None:
    # OpenAI's "tool_calls": the model stopped after calling; a cut-off stays "length".
    return "tool_calls" if made_calls and finish_reason == "stop" else finish_reason


def _chat_deltas(parsed: ParsedDelta) -> list[ChatDelta]:
    """Content in a chunk of its own, then one chunk per call touched."""
    deltas = [ChatDelta(content=parsed.content)] if parsed.content else []
    for call in parsed.calls:
        function = FunctionCallDelta(name=call.name, arguments=call.arguments)
        tool_call = ToolCallDelta(index=call.index, id=call.id, type="function" if call.id else None, function=function)
        deltas.append(ChatDelta(tool_calls=[tool_call]))
    return deltas


def _chat_logprob(entry: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=entry.token,
        logprob=entry.logprob,
        bytes=list(entry.token.encode()),
        top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in entry.top or []],
    )
