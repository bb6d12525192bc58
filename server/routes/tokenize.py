"""POST /tokenize and /detokenize: the server's tokenizer, for clients that count tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import errors
from server.context import get_context
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = get_context(request)
    ctx.lora_name(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise errors.bad_request("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        tokens = ctx.prompts.chat_prompt(body.messages)
    else:
        tokens = ctx.prompts.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=ctx.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = get_context(request)
    ctx.lora_name(request, body.model)
    ctx.prompts.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))
