"""Finetuning jobs driven by engine messages: checkpoints, final adapter, pause, cancel, resume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.finetune import runs
from engine.finetune.checkpoint import TRAINER_STATE
from engine.finetune.state_file import load_state
from engine.llm_engine import LLMEngine
from engine.messages import (
    ControlFinetune,
    FinetuneExample,
    FinetuneSettings,
    StartFinetune,
)
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny

SETTINGS = FinetuneSettings(
    n_epochs=2, batch_size=2, learning_rate=1e-3, warmup_steps=1, weight_decay=0.0, rank=4, alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=False, seed=3, checkpoint_every_steps=2,
)


def _engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=model_dir, dtype="float32", kv_cache_memory_gb=0.01, max_lora_rank=8))


def _start(engine, model_dir, out_dir, resume=False, job_id="ftjob-1"):
    examples = [FinetuneExample(e.token_ids, e.target) for e in make_examples(97, count=6, seed=4)]
    engine.finetune_runs.start(StartFinetune(job_id, examples, SETTINGS, str(out_dir), str(model_dir), resume))


def _run(engine, until=lambda reports: False) -> list:
    reports = []
    while engine.has_work():
        engine.step()
        reports += engine.finetune_runs.reports()
        if until(reports):
            break
    return reports


def test_job_checkpoints_and_final_adapter_loads_in_peft(tmp_path):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    engine = _engine(model_dir)
    _start(engine, model_dir, tmp_path / "job")
    reports = _run(engine)
    steps = [s for r in reports for s in r.steps]
    assert [s.step for s in steps] == list(range(1, 7)) and all(s.total_steps == 6 for s in steps)
    assert all(s.loss > 0 and s.tokens_trained > 0 for s in steps)
    checkpoints = [c for r in reports for c in r.checkpoints]
    assert [step for step, _ in checkpoints] == [2, 4, 6]
    assert reports[-1].status == "succeeded" and reports[-1].final_path == str(tmp_path / "job" / "final")
    for step, path in checkpoints:
        assert path == str(tmp_path / "job" / "checkpoints" / f"step-{step}")
        assert (Path(path) / TRAINER_STATE).is_file() and (Path(path) / "adapter_model.safetensors").is_file()
    # The final adapter is a PEFT adapter of the base model, and it changes the model.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, reports[-1].final_path).eval()
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3
    assert not engine.has_work()


def _train_uninterrupted(tmp_path) -> Path:
    """The tiny model's directory, after a job trained on it without a stop into `tmp_path / "straight"`."""
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    straight = _engine(model_dir)
    _start(straight, model_dir, tmp_path / "straight")
    _run(straight)
    return model_dir


def _assert_same_final_adapter(job_dir: Path, straight_dir: Path) -> None:
    expected = load_file(straight_dir / "final" / "adapter_model.safetensors")
    resumed = load_file(job_dir / "final" / "adapter_model.safetensors")
    assert set(expected) == set(resumed)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5)


def test_resume_from_checkpoint_ends_where_an_uninterrupted_job_ends(tmp_path):
    model_dir = _train_uninterrupted(tmp_path)
    first = _engine(model_dir)
    _start(first, model_dir, tmp_path / "crash")
    _run(first, until=lambda reports: any(c[0] == 4 for r in reports for c in r.checkpoints))
    del first  # the server died after the step-4 checkpoint
    second = _engine(model_dir)
    _start(second, model_dir, tmp_path / "crash", resume=True)
    reports = _run(second)
    assert [s.step for r in reports for s in r.steps] == [5, 6]
    _assert_same_final_adapter(tmp_path / "crash", tmp_path / "straight")


def test_a_stop_between_checkpoints_saves_the_last_step_and_resumes_there(tmp_path):
    """Stopped in the middle of step 4's batch (after step 3; the scheduled checkpoint is
    step 2's): the saved state is step 3's boundary, and the resumed job trains steps
    4-6 to the same adapter as a job never stopped."""
    model_dir = _train_uninterrupted(tmp_path)
    first = _engine(model_dir)
    _start(first, model_dir, tmp_path / "stop")
    reports = _run(first, until=lambda reports: any(s.step == 3 for r in reports for s in r.steps))
    job = first.finetune_runs.runs["ftjob-1"].job
    while job.position == 6:  # into step 4's batch (2 examples each): one sequence done
        first.step()
    assert job.step == 3 and job.position == 7
    first.finetune_runs.save_progress()
    assert (tmp_path / "stop" / "checkpoints" / "step-3" / TRAINER_STATE).is_file()
    assert [c[0] for r in reports + first.finetune_runs.reports() for c in r.checkpoints] == [2]  # not reported
    del first
    # What a crash in the middle of a checkpoint write leaves: its staging directory.
    interrupted = tmp_path / "stop" / "checkpoints" / ".step-4-x1y2"
    interrupted.mkdir()

    second = _engine(model_dir)
    _start(second, model_dir, tmp_path / "stop", resume=True)
    assert not interrupted.exists()
    reports = _run(second)
    assert [s.step for r in reports for s in r.steps] == [4, 5, 6]
    assert reports[-1].steps[-1].tokens_trained == straight_tokens(tmp_path / "straight")
    _assert_same_final_adapter(tmp_path / "stop", tmp_path / "straight")


def straight_tokens(job_dir: Path) -> int:
    """Target tokens trained by the uninterrupted job, from its last checkpoint's state."""
    return load_state(job_dir / "checkpoints" / "step-6" / TRAINER_STATE)["tokens_trained"]


def test_pause_resume_and_cancel(tmp_path):
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    engine = _engine(model_dir)
    _start(engine, model_dir, tmp_path / "a", job_id="a")
    _run(engine, until=lambda reports: any(r.steps for r in reports))
    engine.finetune_runs.control(ControlFinetune("a", "pause"))
    assert engine.finetune_runs.reports()[-1].status == "paused"
    _run(engine)  # finishes the sequence in flight, then idles
    paused_at = engine.finetune.jobs["a"].step
    assert not engine.has_work() and paused_at < 6
    engine.finetune_runs.control(ControlFinetune("a", "resume"))
    _run(engine, until=lambda reports: any(s.step > paused_at for r in reports for s in r.steps))
    engine.finetune_runs.control(ControlFinetune("a", "cancel"))
    assert engine.finetune_runs.reports()[-1].status == "cancelled"
    assert "a" not in engine.finetune.jobs and not engine.has_work()


def test_concurrent_jobs_share_the_finetuning_budget(tmp_path):
    """Two jobs at once, each with its own adapter and optimizer: they advance in turn."""
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    engine = _engine(model_dir)
    _start(engine, model_dir, tmp_path / "a", job_id="a")
    _start(engine, model_dir, tmp_path / "b", job_id="b")
    order = []
    while engine.has_work():
        engine.step()
        order += [r.job_id for r in engine.finetune_runs.reports() for _ in r.steps]
    assert sorted(order) == ["a"] * 6 + ["b"] * 6
    # Neither waits for the other to finish: b steps before a's last step.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    # Same data and seed: separate adapters trained to the same weights, not into one another.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_checkpoints_are_written_off_the_engine_loop(tmp_path, monkeypatch):
    """The loop only snapshots; a checkpoint is reported once its write has finished, and
    holds the state of its step even though training went on meanwhile."""
    release = threading.Event()
    written = []
    write = runs.write_checkpoint

    def slow_write(snapshot, path):
        release.wait(timeout=10)
        write(snapshot, path)
        written.append(path)

    monkeypatch.setattr(runs, "write_checkpoint", slow_write)
    model_dir = tmp_path / "model"
    write_tiny_model(model_dir, tiny_llama_config())
    engine = _engine(model_dir)
    _start(engine, model_dir, tmp_path / "job")
    job = engine.finetune.jobs["ftjob-1"]
    reports = []
    while job.step < 3:  # past the step-2 checkpoint, while its write is held back
        engine.step()
        reports += engine.finetune_runs.reports()
    assert not written and not [c for r in reports for c in r.checkpoints]
    at_step_3 = job.lora.peft_state_dict()
    release.set()
    reports += _run(engine)
    checkpoints = [c for r in reports for c in r.checkpoints]
    assert [step for step, _ in checkpoints] == [2, 4, 6] and reports[-1].status == "succeeded"
    step_2 = load_file(Path(checkpoints[0][1]) / "adapter_model.safetensors")
    assert any(not torch.equal(step_2[key], at_step_3[key]) for key in at_step_3)  # step 2's weights, not later ones
