"""Load and unload LoRA adapters at run time (the routes vLLM serves under the same names); admins only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.auth import require_admin
from server.context import get_context
from server.protocol import ModelCard
from server.routes.models import adapter_card

# A run-time load reads the server's own disk: that is the operator's call, not a tenant's.
router = APIRouter(dependencies=[Depends(require_admin)])


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)


class DeletedModel(BaseModel):
    id: str
    object: str = "model"
    deleted: bool = True


@router.post("/v1/load_lora_adapter", response_model=ModelCard)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> ModelCard:
    ctx = get_context(request)
    ctx.check_engine()
    card = await ctx.adapters.load(body.lora_name, body.lora_path)
    return adapter_card(ctx, card)


@router.post("/v1/unload_lora_adapter", response_model=DeletedModel)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> DeletedModel:
    ctx = get_context(request)
    ctx.check_engine()
    await ctx.adapters.unload(body.lora_name)
    return DeletedModel(id=body.lora_name)
