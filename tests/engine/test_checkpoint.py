"""Checkpoint snapshots: copies of the job's state, refilled in place when one is reused."""

from __future__ import annotations

import pytest
import torch

from engine.finetune.checkpoint import load_checkpoint, take_snapshot, write_checkpoint
from engine.finetune.job import FinetuneJob, Hyperparameters
from engine.finetune.lora_params import LoRAConfig
from engine.model.loader import load_model
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny


def _job(tmp_path) -> FinetuneJob:
    write_tiny_model(tmp_path / "model", tiny_llama_config())
    model = load_model(tmp_path / "model", torch.float32)
    examples = make_examples(model.config.vocab_size, count=2, seed=1)
    return FinetuneJob("job", model, model.lora_layout(), examples, Hyperparameters(n_epochs=1, batch_size=1),
                       LoRAConfig(rank=4, alpha=8), seed=2)


def _train_a_little(job: FinetuneJob) -> None:
    for p in job.lora.parameters():
        p.grad = torch.randn_like(p)
    job.optimizer.step()


def test_a_reused_snapshot_is_refilled_in_place_and_writes_a_loadable_checkpoint(tmp_path):
    job = _job(tmp_path)
    _train_a_little(job)
    first = take_snapshot(job, "base")
    first_a = next(iter(first.adapter.values()))
    _train_a_little(job)
    assert not torch.equal(next(iter(job.lora.peft_state_dict().values())), first_a)  # training moved on
    second = take_snapshot(job, "base", reuse=first)
    assert next(iter(second.adapter.values())) is first_a  # the same buffer, refilled
    assert all(torch.equal(second.adapter[k], v) for k, v in job.lora.peft_state_dict().items())

    write_checkpoint(second, tmp_path / "step-2")
    resumed = _job(tmp_path)
    load_checkpoint(resumed, tmp_path / "step-2")
    for key, value in job.lora.state_dict().items():
        assert torch.equal(resumed.lora.state_dict()[key], value)
    exp_avg = [s["exp_avg"] for s in job.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, resumed.optimizer.state_dict()["state"].values()))
