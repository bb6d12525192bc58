"""`GET /metrics` after real traffic: inference (with per-request SLOs) and a finetuning job.

The server watches the simulated GPU (`--power-device simulated`), so the clock,
power and energy series exist on this CPU machine too; their values come from the
simulated card, the rest from the live engine. Every series of the metrics contract
must be present with values that agree with the traffic that was sent.
"""

from __future__ import annotations

import io
import json
import math
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_deploy_files import (
    COUNTERS,
    GAUGES,
    HISTOGRAM_SERIES,
    HISTOGRAMS,
    ROUTER_INFO,
)
from tests.server.conftest import (
    assert_openai_error,
    paused_after_first_step,
    start_server,
)

pytestmark = pytest.mark.server

TRAINING = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"Say the code number {i}."},
                             {"role": "assistant", "content": f"The code number is {i}."}]})
    for i in range(8)
).encode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("metrics"), "--power-device", "simulated", "--power-mode", "advise")
    yield server
    server.stop()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items -> value}."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    matching = [v for key, v in samples[name].items() if set(labels.items()) <= set(key)]
    assert matching, f"{name} has no sample with {labels}: {samples[name]}"
    return sum(matching)


@pytest.fixture(scope="module")
def traffic(live):
    """Send the traffic once; returns what the tests compare the metrics with."""
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    upload = client.files.create(file=("train.jsonl", io.BytesIO(TRAINING)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=model, training_file=upload.id, hyperparameters={"n_epochs": 2, "batch_size": 2}
    )
    # Paused after its first step, a job is listed with its loss and progress.
    deadline = time.monotonic() + 300
    with paused_after_first_step(client, job.id, timeout=300):
        paused = scrape(live.url)

    replies = []
    # An SLO no request can meet (1 us to the first token) and one every request meets.
    for slo in ({"ttft_ms": 0.001}, {"ttft_ms": 600_000, "tpot_ms": 600_000}):
        replies.append(client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True, "slo": slo},
        ))
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline + 300, "finetuning job did not finish"
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    return {"model": model, "replies": replies, "chunks": chunks, "job": job, "events": events,
            "paused": paused, "samples": scrape(live.url)}


def test_request_series_count_the_traffic(traffic):
    s, model = traffic["samples"], traffic["model"]
    assert value(s, "coserve:request_success_total", model_name=model, finished_reason="length") == 3
    assert value(s, "coserve:generation_tokens_total", model_name=model) == 8 + 8 + 6
    prompt_tokens = sum(r.usage.prompt_tokens for r in traffic["replies"]) + traffic["chunks"][-1].usage.prompt_tokens
    assert value(s, "coserve:prompt_tokens_total", model_name=model) == prompt_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert value(s, f"coserve:{name}_count", model_name=model) == 3, name
    # Inter-token gaps: every token after a request's first.
    assert value(s, "coserve:inter_token_latency_seconds_count", model_name=model) == 7 + 7 + 5
    ttft_sum = value(s, "coserve:time_to_first_token_seconds_sum", model_name=model)
    e2e_sum = value(s, "coserve:e2e_request_latency_seconds_sum", model_name=model)
    assert 0 < ttft_sum < e2e_sum
    # vLLM's TTFT buckets, cumulative up to +Inf.
    buckets = {dict(k)["le"]: v for k, v in s["coserve:time_to_first_token_seconds_bucket"].items()}
    assert buckets["0.001"] <= buckets["2560.0"] == buckets["+Inf"] == 3
    for state in ("running", "waiting"):
        assert value(s, f"coserve:num_requests_{state}", model_name=model) == 0
    assert 0 <= value(s, "coserve:kv_cache_usage_perc") <= 1
    assert value(s, "coserve:num_preemptions_total") == 0
    assert value(s, "coserve:num_requests_waiting_for_lora_slot") == 0
    # The fine-tuned model is an adapter: listed, with nothing running now.
    fine_tuned = traffic["job"].fine_tuned_model
    for state in ("running", "waiting"):
        assert value(s, f"coserve:lora_requests_{state}", lora_name=fine_tuned) == 0


def test_slo_attainment_judges_each_request_by_its_own_slo(traffic):
    s, model = traffic["samples"], traffic["model"]
    assert value(s, "coserve:slo_evaluated_requests_total", model_name=model) == 3
    # The 1-us TTFT request misses; the lenient one meets both; the streamed one is
    # judged by the server's defaults (2 s, 200 ms), which this machine may or may not meet.
    met_ttft = value(s, "coserve:slo_met_requests_total", model_name=model, slo="ttft")
    met_both = value(s, "coserve:slo_met_requests_total", model_name=model, slo="both")
    assert 1 <= met_ttft <= 2
    assert 1 <= met_both <= met_ttft
    assert value(s, "coserve:goodput_tokens_total", model_name=model) in (8, 8 + 6)


def test_iteration_and_finetuning_series(traffic):
    s, job = traffic["samples"], traffic["job"]
    iterations = value(s, "coserve:iteration_time_seconds_count")
    assert iterations > 0
    assert value(s, "coserve:iteration_predicted_time_seconds_count") == iterations
    assert value(s, "coserve:iteration_time_seconds_sum") > 0
    # Only iterations that run inference have a budget; the job also ran alone.
    budgeted = value(s, "coserve:iteration_budget_seconds_count")
    assert 0 < budgeted < iterations
    # Each budget is at most 1.25x the strictest TPOT SLO in its iteration (<= 600 s here).
    assert 0 < value(s, "coserve:iteration_budget_seconds_sum") <= budgeted * 1.25 * 600
    assert 0 <= value(s, "coserve:latency_model_relative_error") < 10
    assert value(s, "coserve:iteration_tokens_total", kind="decode") >= 7 + 7 + 5
    finetune_forward = value(s, "coserve:finetune_tokens_total", phase="forward")
    assert finetune_forward > 0
    assert value(s, "coserve:iteration_tokens_total", kind="finetune") == finetune_forward
    # Every token that went forward also went backward through all layers.
    assert math.isclose(value(s, "coserve:finetune_tokens_total", phase="backward"), finetune_forward, rel_tol=1e-9)
    assert value(s, "coserve:iteration_finetune_share_count") > 0
    assert value(s, "coserve:finetune_steps_total") == 8  # 8 examples, batch 2, 2 epochs
    assert value(s, "coserve:finetune_jobs", status="succeeded") == 1
    assert value(s, "coserve:finetune_jobs", status="running") == 0
    assert not s.get("coserve:finetune_job_loss")  # only running or paused jobs are listed
    paused = traffic["paused"]
    assert value(paused, "coserve:finetune_jobs", status="paused") == 1
    ((labels, progress),) = paused["coserve:finetune_job_progress"].items()
    assert dict(labels)["job_id"] == job.id and 0 < progress < 1
    assert value(paused, "coserve:finetune_job_loss", job_id=job.id) > 0
    assert value(paused, "coserve:finetune_job_energy_joules", job_id=job.id) > 0


def test_power_series_from_the_simulated_gpu(traffic):
    s, model = traffic["samples"], traffic["model"]
    info = s["coserve:power_mode_info"]
    ((labels, one),) = info.items()
    assert one == 1 and dict(labels)["mode"] == "advise" and "simulated" in dict(labels)["device"]
    assert 210 <= value(s, "coserve:gpu_sm_clock_mhz") <= 1980
    assert 210 <= value(s, "coserve:gpu_target_sm_clock_mhz") <= 1980
    assert 80 <= value(s, "coserve:gpu_power_watts") <= 700
    energy = value(s, "coserve:gpu_energy_joules_total")
    finetune_energy = value(s, "coserve:finetune_energy_joules_total")
    request_energy = value(s, "coserve:request_energy_joules_sum", model_name=model)
    assert 0 < finetune_energy < energy
    assert value(s, "coserve:request_energy_joules_count", model_name=model) == 3
    # The iterations' energy is split between requests and the job; only an iteration
    # with nothing scheduled (rare) leaves its energy to no one.
    assert 0.95 * energy <= request_energy + finetune_energy <= energy * (1 + 1e-9)
    assert value(s, "coserve:tokens_per_joule") > 0


def test_energy_reaches_usage_and_job_events(traffic):
    replies = traffic["replies"]
    for reply in replies:
        assert reply.usage.model_extra["energy_joules"] > 0
    assert traffic["chunks"][-1].usage.model_extra["energy_joules"] > 0
    steps = [e.data for e in traffic["events"] if e.data and "step" in e.data]
    assert len(steps) == 8
    energies = [d["energy_joules"] for d in sorted(steps, key=lambda d: d["step"])]
    assert all(e > 0 for e in energies) and energies == sorted(energies)  # cumulative per job


def test_the_server_exposes_exactly_the_series_the_dashboards_are_checked_against(traffic):
    """The deploy tests hold the contract the dashboards are built on; the live server,
    after traffic of every kind, must expose that set and nothing else under coserve:."""
    families = {name for name in traffic["samples"] if name.startswith("coserve:")}
    families |= {name for name in traffic["paused"] if name.startswith("coserve:")}
    exposed = {HISTOGRAM_SERIES.get(name, name) for name in families if not name.endswith("_created")}
    assert exposed == COUNTERS | GAUGES | HISTOGRAMS | ROUTER_INFO


def test_router_info_names_the_adapter_a_request_runs_on(live, traffic):
    """The series an endpoint picker reads, in vLLM's label format: while a streamed
    request on the fine-tuned adapter decodes, the LoRA gauge names it as running."""
    (idle,) = traffic["samples"]["coserve:lora_requests_info"].items()
    assert dict(idle[0]) == {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    (cache,) = traffic["samples"]["coserve:cache_config_info"]
    assert dict(cache)["block_size"] == "16" and int(dict(cache)["num_gpu_blocks"]) > 0
    fine_tuned = traffic["job"].fine_tuned_model
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.completions.create(model=fine_tuned, prompt="Count:", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        before = time.time()
        during = scrape(live.url)
    finally:
        stream.close()
    ((labels, read_at),) = during["coserve:lora_requests_info"].items()
    assert dict(labels) == {"max_lora": "8", "running_lora_adapters": fine_tuned, "waiting_lora_adapters": ""}
    assert before - 1 <= read_at <= time.time() + 1
    assert value(during, "coserve:num_requests_running") == 1


def test_bad_slo_values_are_400s(live):
    for slo, param in (({"ttft_ms": -1}, "slo.ttft_ms"), ({"tpot_ms": 0}, "slo.tpot_ms"),
                       ({"latency": 5}, "slo.latency")):
        response = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "slo": slo},
                              timeout=30)
        assert_openai_error(response, 400, param)
