"""POST /v1/chat/completions: messages rendered by the model's chat template."""

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
    TopLogprob,
)
from server.routes.sampling import kv_ttl_seconds, new_request_id, sampling_params, usage
from server.sse import STREAMED, event, sse_response

router = APIRouter()


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools or body.functions:
        raise errors.bad_request("tools and function calling are not supported", "tools" if body.tools else "functions")
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    ctx = get_context(request)
    lora_name = ctx.lora_name(request, body.model)
    ctx.check_engine()
    _reject_unsupported(body)
    prompt = ctx.prompts.chat_prompt(body.messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(
        ctx,
        body,
        max_tokens=ctx.prompts.fit_max_tokens(len(prompt), requested, "messages"),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    request_id = new_request_id("chatcmpl")
    sequences = make_sequences(ctx.tokenizer, request_id, [(prompt, params)], body.n or 1, body.stop_strings, lora_name, body.slo,
                               kv_ttl_seconds(ctx, body))
    chat = _Chat(ctx, body, request_id, prompt, sequences)
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
    ):
        self.body = body
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
            ChatChoice(
                index=seq.index,
                message=AssistantMessage(content=seq.text),
                logprobs=self._logprobs(seq.logprobs),
                finish_reason=seq.finish_reason,
            )
            for seq in self.sequences
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage([self.prompt], self.sequences)
        )

    async def events(self, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        async with aclosing(deltas):
            # The role comes first and alone, as OpenAI streams it.
            for seq in self.sequences:
                yield event(self._chunk(ChatChunkChoice(index=seq.index, delta=ChatDelta(role="assistant", content=""))))
            async for delta in deltas:
                if not (delta.text or delta.finish_reason or (self.body.logprobs and delta.logprobs)):
                    continue
                choice = ChatChunkChoice(
                    index=delta.index,
                    delta=ChatDelta(content=delta.text or None),
                    logprobs=self._logprobs(delta.logprobs),
                    finish_reason=delta.finish_reason,
                )
                yield event(self._chunk(choice))
        if self.body.include_usage_chunk:
            yield event(self._chunk(None).model_copy(update={"usage": usage([self.prompt], self.sequences)}))

    def _chunk(self, choice: ChatChunkChoice | None) -> ChatCompletionChunk:
        choices = [choice] if choice is not None else []
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)


def _chat_logprob(entry: TokenLogprob) -> ChatTokenLogprob:
    return ChatTokenLogprob(
        token=entry.token,
        logprob=entry.logprob,
        bytes=list(entry.token.encode()),
        top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in entry.top or []],
    )
