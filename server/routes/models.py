"""GET /v1/models: the base model, then every LoRA adapter the caller may use, with
`parent` set to the base model; GET /v1/models/{model}: one of them."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.adapters import AdapterCard
from server.auth import principal_of
from server.context import ServerContext, get_context
from server.protocol import ModelCard, ModelList

router = APIRouter()


def adapter_card(ctx: ServerContext, card: AdapterCard) -> ModelCard:
    return ModelCard(
        id=card.name, created=card.created, root=str(card.path), parent=ctx.served_model_name,
        max_model_len=ctx.max_model_len,
    )


def base_card(ctx: ServerContext) -> ModelCard:
    name = ctx.served_model_name
    return ModelCard(id=name, created=ctx.created, root=name, max_model_len=ctx.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    ctx = get_context(request)
    adapters = ctx.adapters.visible(principal_of(request))
    return ModelList(data=[base_card(ctx), *(adapter_card(ctx, card) for card in adapters)])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """`model:path`, because fine-tuned model names contain colons and may contain slashes."""
    ctx = get_context(request)
    lora = ctx.lora_name(request, model)
    return base_card(ctx) if lora is None else adapter_card(ctx, ctx.adapters.cards[lora])
