"""The server's view of the LoRA adapters it serves, and the checks at the HTTP edge.

The engine owns the weights; this registry owns the names clients use and the rule
that runtime loads only read from the configured `lora_roots`. A load is checked
here (name, path), then in the engine (files, shapes, rank, targets); only when the
engine accepted it does the name appear in /v1/models and become usable.

Adapters loaded by the operator are shared by every caller; a model that a finetuning
job produced (and its checkpoints) belongs to the job's owner, and to anyone else it
does not exist: a 404 exactly like an unknown name, and absent from /v1/models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.messages import LoadAdapter, UnloadAdapter
from server import errors
from server.api_keys import Principal
from server.engine_client import EngineClient


@dataclass(frozen=True)
class AdapterCard:
    name: str
    path: Path
    owner: str | None = None  # None = shared (operator-loaded)
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterRegistry:
    def __init__(self, engine: EngineClient, base_model_name: str, roots: list[Path], started: dict[str, Path]):
        self._engine = engine
        self._base = base_model_name
        self._roots = [root.expanduser().resolve() for root in roots]
        # Adapters from --lora-modules, which the engine loaded before it reported ready.
        self.cards: dict[str, AdapterCard] = {name: AdapterCard(name, path) for name, path in started.items()}

    def lora_name(self, model: str, caller: Principal) -> str | None:
        """The adapter a request's `model` names; None for the base model; 404 for anything else."""
        if model == self._base:
            return None
        card = self.cards.get(model)
        if card is not None and caller.may_use(card.owner):
            return model
        raise errors.model_not_found(model)

    def visible(self, caller: Principal) -> list[AdapterCard]:
        return [card for card in self.cards.values() if caller.may_use(card.owner)]

    def _allowed_path(self, path: str) -> Path:
        if not self._roots:
            raise errors.APIError(
                403,
                "Loading adapters at run time is disabled: the server has no lora_roots configured.",
                type="permission_error",
                param="lora_path",
                code="lora_roots_unset",
            )
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self._roots):
            roots = ", ".join(str(r) for r in self._roots)
            raise errors.bad_request(f"lora_path {path} is not under an allowed adapter root ({roots})", "lora_path")
        return resolved

    async def load(self, name: str, path: str) -> AdapterCard:
        if name == self._base:
            raise errors.bad_request(f"lora_name {name!r} is the base model's name", "lora_name")
        if name in self.cards:
            raise errors.bad_request(f"an adapter named {name!r} is already loaded", "lora_name")
        resolved = self._allowed_path(path)
        done = await self._engine.adapter_op(lambda op_id: LoadAdapter(op_id=op_id, name=name, path=str(resolved)))
        if done.error is not None:
            raise errors.bad_request(done.error, done.param)
        card = self.cards[name] = AdapterCard(name, resolved)
        return card

    async def register_own(self, name: str, path: Path, owner: str) -> AdapterCard:
        """Serve an adapter the server itself produced (a finetuning result of `owner`), outside lora_roots."""
        done = await self._engine.adapter_op(lambda op_id: LoadAdapter(op_id=op_id, name=name, path=str(path)))
        if done.error is not None:
            raise RuntimeError(f"adapter {name} from {path} did not load: {done.error}")
        card = self.cards[name] = AdapterCard(name, Path(path), owner)
        return card

    async def unload(self, name: str) -> None:
        if name not in self.cards:
            raise errors.APIError(
                404, f"no adapter named {name!r} is loaded", type="not_found_error", param="lora_name",
                code="lora_not_found",
            )
        # Gone for new requests at once; the engine lets admitted ones finish.
        del self.cards[name]
        done = await self._engine.adapter_op(lambda op_id: UnloadAdapter(op_id=op_id, name=name))
        if done.error is not None:
            raise errors.bad_request(done.error, done.param)
