"""POST /v1/completions: text in, text out, in OpenAI's legacy completions shape."""

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
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.routes.sampling import kv_ttl_seconds, new_request_id, sampling_params, usage
from server.sse import STREAMED, event, sse_response

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
async def create_completion(body: CompletionRequest, request: Request):
    ctx = get_context(request)
    lora_name = ctx.lora_name(request, body.model)
    ctx.check_engine()
    if body.suffix:
        raise errors.bad_request("suffix is not supported", "suffix")
    prompts = ctx.prompts.completion_prompts(body.prompt)
    prompt_params = [
        (
            ids,
            sampling_params(
                ctx,
                body,
                max_tokens=ctx.prompts.fit_max_tokens(len(ids), body.max_tokens, "prompt"),
                logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if body.echo else None,
            ),
        )
        for ids in prompts
    ]
    n = body.n or 1
    request_id = new_request_id("cmpl")
    sequences = make_sequences(ctx.tokenizer, request_id, prompt_params, n, body.stop_strings, lora_name, body.slo,
                               kv_ttl_seconds(ctx, body))
    completion = _Completion(ctx, body, request_id, prompts, sequences, n)
    deltas = start_generation(ctx.engine, ctx.texts, sequences)
    if body.stream:
        return sse_response(completion.events(deltas))
    return await cancel_on_disconnect(request, completion.collect(deltas))


class _Completion:
    """Renders one request's sequences as a response or as stream chunks."""

    def __init__(
        self,
        ctx: ServerContext,
        body: CompletionRequest,
        request_id: str,
        prompts: list[list[int]],
        sequences: list[Sequence],
        n: int,
    ):
        self.body = body
        self.prompts = prompts
        self.sequences = sequences
        self.id = request_id
        self.created = int(time.time())
        self.model = body.model or ctx.served_model_name
        # The echoed prompt of each choice: the client's own string where it sent one.
        originals = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self.echo = [
            (originals[i // n] if isinstance(originals[i // n], str) else ctx.tokenizer.decode(prompts[i // n]))
            if body.echo
            else ""
            for i in range(len(sequences))
        ]

    async def collect(self, deltas: AsyncIterator[ChoiceDelta]) -> CompletionResponse:
        async with aclosing(deltas):
            async for _ in deltas:
                pass
        choices = []
        for seq in self.sequences:
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = CompletionLogprobs()
                _append_logprobs(logprobs, seq.prompt_logprobs or [], 0)
                _append_logprobs(logprobs, seq.logprobs, len(self.echo[seq.index]))
            choices.append(
                CompletionChoice(
                    index=seq.index, text=self.echo[seq.index] + seq.text, logprobs=logprobs, finish_reason=seq.finish_reason
                )
            )
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage(self.prompts, self.sequences)
        )

    async def events(self, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        # Where the next token's text starts in each choice's text (logprobs' text_offset).
        offsets = [0] * len(self.sequences)
        echoed = [not e for e in self.echo]
        async with aclosing(deltas):
            async for delta in deltas:
                seq = self.sequences[delta.index]
                text = delta.text
                logprobs = CompletionLogprobs() if self.body.logprobs is not None else None
                if not echoed[delta.index]:
                    echoed[delta.index] = True
                    text = self.echo[delta.index] + text
                    if logprobs is not None:
                        offsets[delta.index] = _append_logprobs(logprobs, seq.prompt_logprobs or [], 0)
                if logprobs is not None:
                    offsets[delta.index] = _append_logprobs(logprobs, delta.logprobs, offsets[delta.index])
                if text or delta.finish_reason or (logprobs and logprobs.tokens):
                    choice = CompletionChoice(
                        index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                    yield event(self._chunk([choice]))
        if self.body.include_usage_chunk:
            yield event(self._chunk([]).model_copy(update={"usage": usage(self.prompts, self.sequences)}))

    def _chunk(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices)


def _append_logprobs(out: CompletionLogprobs, entries: list[TokenLogprob], offset: int) -> int:
    """Append entries in the completions shape; return the text offset after them."""
    for entry in entries:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        if entry.top is None:
            out.top_logprobs.append(None)
        else:
            # OpenAI lists the sampled token among the alternatives even when it ranks lower.
            out.top_logprobs.append({**dict(entry.top), entry.token: entry.logprob})
        out.text_offset.append(offset)
        offset += len(entry.token)
    return offset
