"""One HTTP generation request as a stream of per-choice text deltas.

Completions and chat differ only in how they render prompts and responses; both
hand a list of `Sequence`s (one per choice) to `start_generation`, which sends them to the
engine and turns engine tokens into `ChoiceDelta`s: detokenized text, cut at stop
strings, with logprobs attached. When generation ends early (a stop string, the
client leaving, an error) the engine is told to drop the sequence at once, so its
KV-cache blocks are freed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

import msgspec
from transformers import PreTrainedTokenizerBase

from engine.messages import EngineRequest, RequestOutput, SamplingParams, TokenLogprobs
from server import errors
from server.detokenizer import IncrementalDetokenizer
from server.engine_client import EngineClient, OutputStream
from server.protocol import RequestSLO
from server.stop_strings import StopStringMatcher


class TokenTexts:
    """Each token's own text, for logprobs (special tokens spelled out, as OpenAI does)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.text = lru_cache(maxsize=65536)(lambda token_id: tokenizer.decode([token_id]))


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first prompt token, which has no context
    top: list[tuple[str, float]] | None


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


@dataclass
class Sequence:
    """One choice: its engine request and the server-side state of its output."""

    index: int
    request: EngineRequest
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    num_generated: int = 0
    finish_reason: str | None = None
    energy_joules: float | None = None
    cached_tokens: int | None = None  # prompt tokens read from the prefix cache
    prompt_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.stop.text


def make_sequences(
    tokenizer: PreTrainedTokenizerBase,
    request_id: str,
    prompts: list[tuple[list[int], SamplingParams]],
    n: int,
    stop_strings: list[str],
    lora_name: str | None = None,
    slo: RequestSLO | None = None,
    kv_ttl_s: float | None = None,
) -> list[Sequence]:
    """`n` choices per prompt, indexed prompt-major; choice i of a prompt uses seed + i
    (wrapped around within 64 bits, the range of a seed)."""
    ttft_ms, tpot_ms = (slo.ttft_ms, slo.tpot_ms) if slo is not None else (None, None)
    sequences = []
    now = time.time()
    for prompt_ids, params in prompts:
        for i in range(n):
            index = len(sequences)
            choice_params = params
            if params.seed is not None and i:
                seed = (params.seed + i + 2**63) % 2**64 - 2**63
                choice_params = msgspec.structs.replace(params, seed=seed)
            request = EngineRequest(
                f"{request_id}-{index}", prompt_ids, choice_params, now, lora_name, ttft_ms, tpot_ms, kv_ttl_s
            )
            sequences.append(
                Sequence(index, request, IncrementalDetokenizer(tokenizer, prompt_ids), StopStringMatcher(stop_strings))
            )
    return sequences


def start_generation(engine: EngineClient, texts: TokenTexts, sequences: list[Sequence]) -> AsyncIterator[ChoiceDelta]:
    """Submit now (so a full queue or dead engine fails the request before any response
    is sent); the returned generator yields deltas until every sequence finished, and
    closing it early aborts the rest."""
    return _deltas(engine.open_stream([s.request for s in sequences]), texts, sequences)


async def _deltas(stream: OutputStream, texts: TokenTexts, sequences: list[Sequence]) -> AsyncIterator[ChoiceDelta]:
    by_id = {s.request.request_id: s for s in sequences}
    try:
        while stream.unfinished:
            output = await stream.get()  # raises the APIError that ends the request early
            seq = by_id[output.request_id]
            if output.finish_reason == "error":
                # The engine refused it at admission (e.g. its adapter was unloaded meanwhile).
                raise errors.bad_request(output.error or "the engine could not run this request", "model")
            if seq.finish_reason is not None:
                continue  # already ended by a stop string; a late token from the engine
            delta = _apply(seq, output, texts)
            if delta.finish_reason is not None and output.finish_reason is None:
                stream.finish_early(output.request_id)
            yield delta
    finally:
        stream.close()


def _apply(seq: Sequence, output: RequestOutput, texts: TokenTexts) -> ChoiceDelta:
    seq.num_generated += len(output.new_token_ids)
    if output.energy_joules is not None:
        seq.energy_joules = output.energy_joules
    if output.cached_tokens is not None:
        seq.cached_tokens = output.cached_tokens
    if output.prompt_logprobs is not None:
        seq.prompt_logprobs = _prompt_logprobs(seq.request.prompt_token_ids, output.prompt_logprobs, texts)
    new_logprobs = [
        _token_logprob(token_id, entry, texts) for token_id, entry in zip(output.new_token_ids, output.logprobs or [])
    ]
    seq.logprobs.extend(new_logprobs)
    text = seq.stop.feed(seq.detokenizer.add(output.new_token_ids))
    if seq.stop.stopped:
        seq.finish_reason = "stop"
    elif output.finish_reason is not None:
        text += seq.stop.feed(seq.detokenizer.flush())
        if not seq.stop.stopped:
            text += seq.stop.flush()
        seq.finish_reason = "stop" if seq.stop.stopped else output.finish_reason
    return ChoiceDelta(seq.index, text, new_logprobs, seq.finish_reason)


def _token_logprob(token_id: int, entry: TokenLogprobs, texts: TokenTexts) -> TokenLogprob:
    sampled, top = entry
    return TokenLogprob(texts.text(token_id), sampled, [(texts.text(t), lp) for t, lp in top])


def _prompt_logprobs(prompt_ids: list[int], entries: list[TokenLogprobs], texts: TokenTexts) -> list[TokenLogprob]:
    first = TokenLogprob(texts.text(prompt_ids[0]), None, None)
    return [first] + [_token_logprob(t, e, texts) for t, e in zip(prompt_ids[1:], entries)]
