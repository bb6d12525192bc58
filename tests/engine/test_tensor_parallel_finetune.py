"""Token-level finetuning at tensor-parallel size 2 (gloo, two processes) against size 1.

The same co-served job (inference requests arriving while it trains) runs in an
LLMEngine at TP=1 and in one at TP=2, which starts its second rank as a server would.
At TP=2 each rank holds its share of the LoRA factors and their optimizer state; the
forward runs in the sharded model and the backward through the same collectives. The
final adapters and the checkpoints' trainer states (gathered into whole tensors) must
agree within 1e-4 per tensor, and the TP=2 adapter must load with peft. A TP=2 engine
also resumes a TP=1 checkpoint (sharding the whole state it reads) to TP=1's result.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.finetune.checkpoint import TRAINER_STATE
from engine.finetune.state_file import load_state
from engine.llm_engine import LLMEngine
from engine.messages import (
    ControlFinetune,
    EngineRequest,
    FinetuneExample,
    FinetuneSettings,
    SamplingParams,
    StartFinetune,
)
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.tiny_models import tiny_llama_config

pytestmark = pytest.mark.tiny

# All seven projections: column-parallel ones (A whole, B split) and row-parallel ones
# (o and down: A split, B whole), whose gradients are summed over the ranks.
SETTINGS = FinetuneSettings(
    n_epochs=2, batch_size=2, learning_rate=1e-3, warmup_steps=1, weight_decay=0.01, rank=4, alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=False,
    seed=3, checkpoint_every_steps=2,
)


def _engine(model_dir: Path, tensor_parallel_size: int, device: str = "cpu") -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=model_dir, dtype="float32", kv_cache_memory_gb=0.01, max_num_batched_tokens=32, max_num_seqs=8,
        max_lora_rank=8, tensor_parallel_size=tensor_parallel_size, num_threads=1, device=device,
    ))


def _start(engine: LLMEngine, model_dir: Path, out_dir: Path, job_id: str = "ftjob-tp", resume: bool = False):
    examples = [FinetuneExample(e.token_ids, e.target) for e in make_examples(97, count=6, seed=4)]
    engine.finetune_runs.start(StartFinetune(job_id, examples, SETTINGS, str(out_dir), str(model_dir), resume))


def _run(engine: LLMEngine, until=lambda reports: False) -> list:
    """Steps while there is work (or until `until(reports)`), with inference requests
    arriving every few iterations; returns the jobs' reports."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reports, i = [], 0
    while engine.has_work() and not until(reports):
        if i < 60 and i % 4 == 0:
            engine.add_request(EngineRequest(f"r{i}-{time.monotonic_ns()}", list(range(3, 3 + 5 + i % 7)), params,
                                             time.time()))
        engine.step()
        reports += engine.finetune_runs.reports()
        i += 1
    return reports


def train(model_dir: Path, out_dir: Path, tensor_parallel_size: int, resume: bool = False,
          device: str = "cpu") -> list:
    """Run the job to its end in a fresh engine, co-served; returns its reports."""
    engine = _engine(model_dir, tensor_parallel_size, device)
    try:
        _start(engine, model_dir, out_dir, resume=resume)
        return _run(engine)
    finally:
        engine.close()


def assert_close_tensors(actual: dict, expected: dict, atol: float = 1e-4) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def test_a_co_served_job_at_tp2_trains_the_adapter_tp1_trains(tp_model_dir, tmp_path):
    one = train(tp_model_dir, tmp_path / "tp1", 1)
    two = train(tp_model_dir, tmp_path / "tp2", 2)
    assert two[-1].status == "succeeded" and one[-1].status == "succeeded"
    losses = {n: [s.loss for r in reports for s in r.steps] for n, reports in (("tp1", one), ("tp2", two))}
    assert len(losses["tp2"]) == 6
    torch.testing.assert_close(losses["tp2"], losses["tp1"], atol=1e-4, rtol=0)

    final = load_file(tmp_path / "tp2" / "final" / "adapter_model.safetensors")
    assert_close_tensors(final, load_file(tmp_path / "tp1" / "final" / "adapter_model.safetensors"))
    # Whole PEFT shapes: B of q_proj [q heads x head_dim, r], A of down_proj [r, intermediate].
    config = tiny_llama_config()
    assert final["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (config.hidden_size, 4)
    assert final["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, config.intermediate_size)

    # The checkpoints' trainer states (parameters, AdamW moments) gathered whole.
    for step in (2, 4, 6):
        state_two = load_state(tmp_path / "tp2" / "checkpoints" / f"step-{step}" / TRAINER_STATE)
        state_one = load_state(tmp_path / "tp1" / "checkpoints" / f"step-{step}" / TRAINER_STATE)
        assert_close_tensors(state_two["lora"], state_one["lora"])
        moments_two, moments_one = state_two["optimizer"]["state"], state_one["optimizer"]["state"]
        assert len(moments_two) == len(moments_one) == len(state_one["lora"])
        for index in moments_one:
            assert_close_tensors({k: v for k, v in moments_two[index].items() if k != "step"},
                                  {k: v for k, v in moments_one[index].items() if k != "step"})

    # The TP=2 adapter is an ordinary PEFT adapter of the base model.
    base = AutoModelForCausalLM.from_pretrained(tp_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, tmp_path / "tp2" / "final").eval()(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_tp2_resumes_a_tp1_checkpoint_to_the_tp1_result(tp_model_dir, tmp_path):
    train(tp_model_dir, tmp_path / "tp1", 1)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "tp1" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    reports = train(tp_model_dir, resumed, 2, resume=True)
    assert [s.step for r in reports for s in r.steps] == [3, 4, 5, 6]
    assert_close_tensors(load_file(resumed / "final" / "adapter_model.safetensors"),
                          load_file(tmp_path / "tp1" / "final" / "adapter_model.safetensors"))


def test_a_job_cancelled_mid_training_at_tp2_leaves_the_ranks_serving_and_training(tp_model_dir, tmp_path):
    """Cancelled in the middle of its backward (activations kept on both ranks, its slot
    loaded), a job's tensors go on every rank; the engine serves on, and the next job
    trains to TP=1's adapter."""
    engine = _engine(tp_model_dir, 2)
    try:
        _start(engine, tp_model_dir, tmp_path / "cancelled", job_id="first")
        job = engine.finetune.jobs["first"]
        _run(engine, until=lambda reports: job.step >= 1 and job.backward is not None)
        assert job.backward is not None and job.step == 1
        engine.finetune_runs.control(ControlFinetune("first", "cancel"))
        assert engine.finetune_runs.reports()[-1].status == "cancelled"
        _start(engine, tp_model_dir, tmp_path / "second", job_id="second")
        reports = _run(engine)
    finally:
        engine.close()
    assert reports[-1].status == "succeeded"
    train(tp_model_dir, tmp_path / "tp1", 1)
    assert_close_tensors(load_file(tmp_path / "second" / "final" / "adapter_model.safetensors"),
                         load_file(tmp_path / "tp1" / "final" / "adapter_model.safetensors"))
