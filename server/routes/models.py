"""GET /v1/models: the one base model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import get_context
from server.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    ctx = get_context(request)
    name = ctx.served_model_name
    card = ModelCard(id=name, created=ctx.created, root=name, max_model_len=ctx.max_model_len)
    return ModelList(data=[card])
