"""GET /v1/models: the base model, then every LoRA adapter with `parent` set to it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.adapters import AdapterCard
from server.context import ServerContext, get_context
from server.protocol import ModelCard, ModelList

router = APIRouter()


def adapter_card(ctx: ServerContext, card: AdapterCard) -> ModelCard:
    return ModelCard(
        id=card.name, created=card.created, root=str(card.path), parent=ctx.served_model_name,
        max_model_len=ctx.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    ctx = get_context(request)
    name = ctx.served_model_name
    base = ModelCard(id=name, created=ctx.created, root=name, max_model_len=ctx.max_model_len)
    return ModelList(data=[base, *(adapter_card(ctx, card) for card in ctx.adapters.cards.values())])
