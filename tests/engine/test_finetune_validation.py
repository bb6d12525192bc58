"""Validation loss of a finetuning job: scored on checkpoint steps and the last step.

The reference is transformers + peft with the adapter the job checkpointed at that step
(the checkpoint holds that step's weights: training waits for the validation pass):
summed cross-entropy over the validation targets divided by their number. Validation
only reads the weights, so a job trains to exactly the same adapter with or without it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.messages import (
    EngineRequest,
    FinetuneExample,
    SamplingParams,
    StartFinetune,
)
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.test_finetune_runs import SETTINGS, _engine
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny

VOCAB = tiny_llama_config().vocab_size


def _examples(count: int, seed: int) -> list[FinetuneExample]:
    return [FinetuneExample(e.token_ids, e.target) for e in make_examples(VOCAB, count=count, seed=seed)]


def _train(model_dir, out_dir, validation: list[FinetuneExample], with_inference: bool = False,
           resume: bool = False, stop_at_checkpoint: int | None = None):
    """Runs a job (6 steps, checkpoints at 2, 4, 6) to the end, or to the checkpoint
    `stop_at_checkpoint`; returns its step reports."""
    engine = _engine(model_dir)
    engine.finetune_runs.start(StartFinetune("job", _examples(6, seed=4), SETTINGS, str(out_dir), str(model_dir),
                                        resume=resume, validation=validation))
    steps, checkpoints, iterations = [], [], 0
    while engine.has_work() and stop_at_checkpoint not in checkpoints:
        if with_inference and iterations % 5 == 0:
            params = SamplingParams(max_tokens=4, temperature=0.0)
            engine.add_request(EngineRequest(f"inf{iterations}", list(range(3, 13)), params, time.time()))
        engine.step()
        iterations += 1
        for report in engine.finetune_runs.reports():
            steps += report.steps
            checkpoints += [step for step, _ in report.checkpoints]
    engine.close()
    return steps


def _crash_after_checkpoint(out_dir: Path, steps: list, checkpoint: int) -> list:
    """What a server that died right after `checkpoint` was written leaves behind.

    Checkpoints are written off the engine loop, so by the time one is reported the job
    may have stepped on (and, rarely, written the next): the process dies before any of
    that is written, and the steps past the checkpoint are lost with it."""
    for later in [p for p in (out_dir / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) > checkpoint]:
        shutil.rmtree(later)
    shutil.rmtree(out_dir / "final", ignore_errors=True)
    return [s for s in steps if s.step <= checkpoint]


def _reference_loss(model_dir, adapter_dir: Path, validation: list[FinetuneExample]) -> float:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in validation:
            ids = torch.tensor([example.token_ids])
            targets = torch.tensor([t if keep else -100 for t, keep in zip(example.token_ids, example.target)])
            logits = model(ids).logits[0]  # [T, vocab]
            total += float(F.cross_entropy(logits[:-1], targets[1:], ignore_index=-100, reduction="sum"))
            count += sum(example.target[1:])
    return total / count


def test_valid_loss_equals_peft_reference_at_checkpoint_steps(tmp_path):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    validation = _examples(3, seed=11)
    steps = _train(model_dir, tmp_path / "job", validation, with_inference=True)
    assert sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    assert [s.step for s in steps] == list(range(1, 7))
    scored = {s.step: s.valid_loss for s in steps if s.valid_loss is not None}
    assert sorted(scored) == [2, 4, 6]
    for step, valid_loss in scored.items():
        reference = _reference_loss(model_dir, tmp_path / "job" / "checkpoints" / f"step-{step}", validation)
        assert abs(valid_loss - reference) / reference <= 1e-4, (step, valid_loss, reference)
    assert len(set(scored.values())) == 3, "each step is scored with its own weights"


def test_validation_leaves_training_untouched(tmp_path):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    plain = _train(model_dir, tmp_path / "plain", validation=[])
    validated = _train(model_dir, tmp_path / "validated", validation=_examples(3, seed=11))
    assert all(s.valid_loss is None for s in plain)
    assert [s.loss for s in validated] == [s.loss for s in plain]
    for name in ("checkpoints/step-2", "checkpoints/step-4", "final"):
        expected = load_file(tmp_path / "plain" / name / "adapter_model.safetensors")
        actual = load_file(tmp_path / "validated" / name / "adapter_model.safetensors")
        assert set(actual) == set(expected)
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name


def test_resumed_job_reports_the_same_validation_losses(tmp_path):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    validation = _examples(3, seed=11)
    straight = _train(model_dir, tmp_path / "straight", validation)
    reported = _train(model_dir, tmp_path / "crash", validation, stop_at_checkpoint=4)
    before = _crash_after_checkpoint(tmp_path / "crash", reported, checkpoint=4)
    after = _train(model_dir, tmp_path / "crash", validation, resume=True)
    assert [s.step for s in before] == [1, 2, 3, 4] and [s.step for s in after] == [5, 6]
    for ours, expected in zip(before + after, straight, strict=True):
        assert (ours.valid_loss is None) == (expected.valid_loss is None)
        if ours.valid_loss is not None:
            assert abs(ours.valid_loss - expected.valid_loss) <= 1e-6 * expected.valid_loss, ours.step
