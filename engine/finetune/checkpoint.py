"""Checkpoints of a finetuning job: a servable PEFT adapter plus the trainer state.

    <dir>/adapter_config.json, adapter_model.safetensors   loads with PeftModel.from_pretrained
    <dir>/trainer_state.pt                                 optimizer, schedule, progress

The adapter half is what a client serves (`fine_tuned_model_checkpoint`); the
trainer half is what a restarted server resumes from, so the job continues exactly
where the checkpoint was taken. The directory appears atomically (written aside,
then renamed), so a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from engine.finetune.job import FinetuneJob

TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(job: FinetuneJob, path: Path, base_model: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    job.lora.save_peft(staging / "adapter", base_model)
    for name in os.listdir(staging / "adapter"):
        os.replace(staging / "adapter" / name, staging / name)
    os.rmdir(staging / "adapter")
    with open(staging / TRAINER_STATE, "wb") as f:
        torch.save(job.trainer_state(), f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)


def load_checkpoint(job: FinetuneJob, path: Path) -> None:
    """Continue `job` (freshly built with the same data and settings) from `path`."""
    state = torch.load(Path(path) / TRAINER_STATE, weights_only=True)
    job.load_trainer_state(state)
