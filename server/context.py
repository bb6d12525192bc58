"""What every route needs, built once at start-up and kept on `app.state.ctx`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from server import errors
from server.adapters import AdapterRegistry
from server.api_keys import KeyRing
from server.auth import principal_of
from server.engine_client import EngineClient
from server.finetune.manager import JobManager
from server.generation import TokenTexts
from server.prompts import PromptEncoder
from server.settings import Settings
from server.store import Store


@dataclass
class ServerContext:
    settings: Settings
    keys: KeyRing
    engine: EngineClient
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptEncoder
    texts: TokenTexts
    served_model_name: str
    adapters: AdapterRegistry
    store: Store
    jobs: JobManager
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.prompts.max_model_len

    def lora_name(self, request: Request, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` selects; None (or no model) is the base model;
        unknown, or another owner's, is a 404."""
        return None if model is None else self.adapters.lora_name(model, principal_of(request))

    def check_engine(self) -> None:
        if not self.engine.alive:
            raise errors.engine_unavailable(self.engine.dead_reason or "not started")


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
