"""Finetuning inside LLMEngine.step(): inference first, finetuning within the TPOT SLO."""

from __future__ import annotations

import time

import pytest

from engine.config import EngineConfig
from engine.finetune.job import FinetuneJob, Hyperparameters
from engine.finetune.lora_params import LoRAConfig
from engine.llm_engine import LLMEngine
from engine.messages import EngineRequest, SamplingParams
from tests.engine.test_finetune_equivalence import make_examples
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny


def _engine(model_dir, tpot_slo_ms: float) -> LLMEngine:
    config = EngineConfig(model_dir=model_dir, dtype="float32", kv_cache_memory_gb=0.01, max_num_batched_tokens=64,
                          max_num_seqs=8, tpot_slo_ms=tpot_slo_ms, max_lora_rank=8)
    return LLMEngine(config)


def _run(engine: LLMEngine, job: FinetuneJob, inference_rounds: int) -> list:
    """Steps until everything is done, with a stream of inference requests; returns each iteration's stats."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    history = []
    engine.finetune.add_job(job)
    i = 0
    while engine.has_work():
        if i < inference_rounds and i % 3 == 0:
            engine.add_request(EngineRequest(f"r{i}", list(range(3, 15)), params, time.time()))
        _, stats = engine.step()
        history.append(stats)
        i += 1
    return history


def _job(engine: LLMEngine) -> FinetuneJob:
    examples = make_examples(engine.model.config.vocab_size, count=6, seed=3)
    return FinetuneJob("job", engine.model, engine.loras.layout, examples,
                       Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3), LoRAConfig(rank=4, alpha=8), seed=1)


def test_finetuning_fills_iterations_next_to_inference_within_a_loose_slo(tmp_path):
    write_tiny_model(tmp_path, tiny_llama_config())
    engine = _engine(tmp_path, tpot_slo_ms=10_000)
    job = _job(engine)
    history = _run(engine, job, inference_rounds=60)
    assert job.done and len(job.events) == job.total_steps
    shared = [s for s in history if s.finetune_forward_tokens and s.num_running]
    assert shared, "finetuning should share iterations with running inference"
    assert any(s.finetune_backward_layer_tokens for s in history)
    assert history[-1].latency_model_error is not None
    # Iterations that run inference carry their time budget (SLO 10 s, at most 1.25x it).
    for stats in history:
        runs_inference = stats.decode_tokens + stats.prefill_tokens > 0
        assert (stats.budget_seconds is not None) == runs_inference
        assert not runs_inference or 0 < stats.budget_seconds <= 12.5
    # The backward's layers and loss passes were timed: their prices are measured ones.
    assert 0 < engine.finetune.backward_costs.per_layer_token(prior=-1.0) < 1.0
    assert 0 < engine.finetune.backward_costs.per_loss_token(prior=-1.0) < 1.0


def test_finetuning_yields_to_inference_under_a_tight_slo(tmp_path):
    """A TPOT SLO no iteration can meet: once the latency model is warm, every iteration
    with inference in it carries no finetuning tokens; the job still finishes in the gaps."""
    write_tiny_model(tmp_path, tiny_llama_config())
    engine = _engine(tmp_path, tpot_slo_ms=1e-3)
    job = _job(engine)
    history = _run(engine, job, inference_rounds=90)
    assert job.done
    warm = history[25:]
    with_inference = [s for s in warm if s.num_running]
    assert with_inference and all(s.finetune_forward_tokens == 0 for s in with_inference)
    assert all(s.finetune_backward_layer_tokens == 0 for s in with_inference)
    assert all(s.budget_seconds == 0.0 for s in with_inference), "every request is behind its SLO: no budget"
    assert any(s.finetune_forward_tokens > 0 for s in history), "finetuning ran when inference was idle"
