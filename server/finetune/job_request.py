"""POST /v1/fine_tuning/jobs: the request, and how its "auto" values resolve.

OpenAI's fields: `model`, `training_file`, `validation_file`, `hyperparameters` (or
`method: {type: supervised, supervised: {hyperparameters}}`) with `n_epochs`,
`batch_size`, `learning_rate_multiplier`, each a number or "auto"; `suffix`, `seed`,
`metadata`. LoRA settings OpenAI has no field for go in the extra object `lora`.

"auto" resolves to these documented numbers, chosen so that a small job (a few dozen
examples, a few epochs) visibly learns on the default model:
  n_epochs 3, batch_size 4, learning_rate_multiplier 1.0 x lora.learning_rate (1e-3),
  lora.rank 16, lora.alpha 32, lora.target_modules all seven projections,
  lora.max_seq_len 1024 tokens, warmup 10% of the steps.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.messages import FinetuneSettings

AUTO_N_EPOCHS = 3
AUTO_BATCH_SIZE = 4
AUTO_LR_MULTIPLIER = 1.0
BASE_LEARNING_RATE = 1e-3
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_MAX_SEQ_LEN = 1024
WARMUP_FRACTION = 0.1
# A checkpoint every this many optimizer steps, and one at the end.
CHECKPOINT_EVERY_STEPS = 10


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"  # passes over the data
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"  # examples per optimizer step
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = "auto"  # x lora.learning_rate


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


class LoRAOptions(BaseModel):
    """coserve's extra settings of the trained adapter."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(DEFAULT_RANK, ge=1, le=256)
    alpha: float = Field(DEFAULT_ALPHA, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    learning_rate: float = Field(BASE_LEARNING_RATE, gt=0, le=1)
    max_seq_len: int = Field(DEFAULT_MAX_SEQ_LEN, ge=2)
    use_rslora: bool = False


class CreateJobRequest(BaseModel):
    """Fields this server does not implement (such as `integrations`) are refused with a
    400 naming them, never dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    lora: LoRAOptions = Field(default_factory=LoRAOptions)

    def resolved_hyperparameters(self) -> dict:
        """n_epochs, batch_size, learning_rate_multiplier with "auto" replaced by numbers."""
        given = self.hyperparameters
        if self.method is not None:
            given = self.method.supervised.hyperparameters
        given = given or Hyperparameters()
        return {
            "n_epochs": AUTO_N_EPOCHS if given.n_epochs == "auto" else given.n_epochs,
            "batch_size": AUTO_BATCH_SIZE if given.batch_size == "auto" else given.batch_size,
            "learning_rate_multiplier": (
                AUTO_LR_MULTIPLIER if given.learning_rate_multiplier == "auto" else given.learning_rate_multiplier
            ),
        }


def engine_settings(hyperparameters: dict, lora: dict, seed: int, num_examples: int) -> FinetuneSettings:
    steps = hyperparameters["n_epochs"] * math.ceil(num_examples / hyperparameters["batch_size"])
    return FinetuneSettings(
        n_epochs=hyperparameters["n_epochs"],
        batch_size=hyperparameters["batch_size"],
        learning_rate=lora["learning_rate"] * hyperparameters["learning_rate_multiplier"],
        warmup_steps=int(steps * WARMUP_FRACTION),
        weight_decay=0.0,
        rank=lora["rank"],
        alpha=lora["alpha"],
        target_modules=list(lora["target_modules"]),
        use_rslora=lora["use_rslora"],
        seed=seed,
        checkpoint_every_steps=CHECKPOINT_EVERY_STEPS,
    )
