"""Request fields shared by completions and chat -> the engine's SamplingParams."""

from __future__ import annotations

import uuid

from engine.messages import SamplingParams, StructuredOutput
from server.context import ServerContext
from server.generation import Sequence
from server import errors
from server.protocol import GenerationRequest, PromptTokensDetails, Usage
from server.structured import structured_output


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompts: list[list[int]], sequences: list[Sequence]) -> Usage:
    """Each prompt counts once however many choices it has (its cached tokens those of
    its first choice); every generated token counts."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(s.num_generated for s in sequences)
    choices_per_prompt = len(sequences) // len(prompts)
    cached_tokens = sum(s.cached_tokens or 0 for s in sequences[::choices_per_prompt])
    energies = [s.energy_joules for s in sequences if s.energy_joules is not None]
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                 energy_joules=sum(energies) if energies else None)


def kv_ttl_seconds(ctx: ServerContext, body: GenerationRequest) -> float | None:
    """The request's `kv_ttl`, checked against the server's settings."""
    if body.kv_ttl is None:
        return None
    settings = ctx.settings
    if not settings.enable_prefix_caching:
        raise errors.bad_request("kv_ttl needs prefix caching, which this server has turned off", "kv_ttl")
    if body.kv_ttl > settings.max_kv_ttl_s:
        raise errors.bad_request(
            f"kv_ttl may be at most {settings.max_kv_ttl_s:g} seconds (max_kv_ttl_s); got {body.kv_ttl:g}", "kv_ttl"
        )
    return body.kv_ttl


def sampling_params(
    ctx: ServerContext,
    body: GenerationRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    grammar: StructuredOutput | None = None,
) -> SamplingParams:
    """grammar: a constraint of the route's own (tool calls) in place of the request's
    response_format / structured_outputs, which the route has refused beside it."""
    stop_token_ids = body.stop_token_ids or []
    ctx.prompts.check_token_ids(stop_token_ids, "stop_token_ids")
    top_k = body.top_k or 0
    return SamplingParams(
        logit_bias=_logit_bias(ctx, body),
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both disable
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=bool(body.ignore_eos),
        stop_token_ids=tuple(stop_token_ids),
        structured=grammar if grammar is not None else structured_output(body),
    )


def _logit_bias(ctx: ServerContext, body: GenerationRequest) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; keys must be token ids of this model."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.strip().isdigit()):
            raise errors.bad_request(f"logit_bias keys must be token ids; got {key!r}", "logit_bias")
        pairs.append((int(key), bias))
    ctx.prompts.check_token_ids([token for token, _ in pairs], "logit_bias")
    return tuple(pairs)
