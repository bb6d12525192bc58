"""LLMEngine with a power device (the simulated GPU): energy charged to requests and jobs,
queue time reported, and the governor's view of the load honouring per-request SLOs."""

from __future__ import annotations

import time

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.messages import EngineRequest, SamplingParams
from tests.engine.test_finetune_engine import _job
from tests.engine.tiny_models import tiny_llama_config, write_tiny_model

pytestmark = pytest.mark.tiny


@pytest.fixture
def engine(tmp_path) -> LLMEngine:
    write_tiny_model(tmp_path, tiny_llama_config())
    config = EngineConfig(model_dir=tmp_path, dtype="float32", kv_cache_memory_gb=0.01, max_num_batched_tokens=64,
                          max_num_seqs=8, max_lora_rank=8, power_device="simulated", power_mode="advise")
    return LLMEngine(config)


def _request(request_id: str, ttft_slo_ms=None, tpot_slo_ms=None) -> EngineRequest:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return EngineRequest(request_id, list(range(3, 20)), params, time.time(), None, ttft_slo_ms, tpot_slo_ms)


def test_iteration_energy_goes_to_requests_and_jobs(engine):
    assert engine.ready_info().power_device == "simulated H100 SXM"
    job = _job(engine)
    engine.finetune.add_job(job)
    for i in range(3):
        engine.add_request(_request(f"r{i}"))
    energy = finetune_energy = 0.0
    finals, firsts = {}, {}
    while engine.has_work():
        outputs, stats = engine.step()
        energy += stats.energy_joules
        finetune_energy += stats.finetune_energy_joules
        assert 210 <= stats.sm_clock_mhz <= 1980 and stats.power_watts > 0
        for output in outputs:
            firsts.setdefault(output.request_id, output)
            if output.finish_reason is not None:
                finals[output.request_id] = output
    assert set(finals) == {"r0", "r1", "r2"}
    assert all(firsts[r].queued_seconds is not None and firsts[r].queued_seconds >= 0 for r in finals)
    request_energy = sum(o.energy_joules for o in finals.values())
    assert all(o.energy_joules > 0 for o in finals.values())
    assert 0 < finetune_energy < energy
    assert job.energy_joules == pytest.approx(finetune_energy)
    assert job.events[-1].energy_joules <= job.energy_joules
    # Every iteration here had work to charge: nothing is left over.
    assert request_energy + finetune_energy == pytest.approx(energy)


def test_the_governor_sees_the_strictest_slo_of_the_admitted_requests(engine):
    engine.add_request(_request("default"))
    engine.add_request(_request("strict-tpot", tpot_slo_ms=50))
    engine.add_request(_request("strict-ttft", ttft_slo_ms=300))
    load = engine._load_state()
    assert load.tpot_slo_ms == pytest.approx(50)
    assert load.ttft_slo_ms == pytest.approx(300)
    assert len(load.waiting_prompt_tokens) == 3 and not load.running_context_lens
    engine.abort(["strict-tpot", "strict-ttft"])
    load = engine._load_state()
    assert load.tpot_slo_ms == pytest.approx(engine.config.tpot_slo_ms)
    assert load.ttft_slo_ms == pytest.approx(engine.config.ttft_slo_ms)
