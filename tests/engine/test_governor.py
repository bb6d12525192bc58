"""Frequency governor on the simulated GPU: decisions, modes, and a bursty request trace.

The trace test runs a small continuous-batching loop (decodes first, then FCFS
prefill chunks in a token budget) against `SimulatedGpu`, once with the governor
locking clocks and once at the top clock, and compares SLO attainment and energy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest

from engine.latency_model import IterationShape, LatencyModel
from engine.power.governor import FrequencyGovernor, LoadState
from engine.power.simulated_device import SimulatedGpu

TTFT_SLO_MS = 600.0
TPOT_SLO_MS = 30.0
TOP_MHZ = 1980
MAX_BATCHED_TOKENS = 1024
MAX_SEQS = 64


def calibrated_model(gpu: SimulatedGpu) -> LatencyModel:
    """A latency model that has seen the GPU run mixed iterations at many clocks."""
    rng = np.random.default_rng(0)
    clocks = gpu.supported_sm_clocks_mhz()
    model = LatencyModel(max_clock_mhz=clocks[-1])
    for _ in range(200):
        decode = int(rng.integers(0, 64))
        prefill = int(rng.integers(0, 512))
        start = int(rng.integers(0, 1024))
        prefill_context = prefill * start + prefill * (prefill + 1) // 2
        decode_context = decode * int(rng.integers(64, 2048))
        context = decode_context + prefill_context
        shape = IterationShape(decode, prefill, context, prefill_context_tokens=prefill_context)
        mhz = int(rng.choice(clocks))
        model.observe(shape, gpu.iteration_seconds(shape, mhz), mhz)
    return model


def governor(mode: str, gpu: SimulatedGpu | None = None) -> FrequencyGovernor:
    gpu = gpu or SimulatedGpu()
    return FrequencyGovernor(gpu, calibrated_model(gpu), TTFT_SLO_MS, TPOT_SLO_MS, margin=0.1, mode=mode)


LIGHT = LoadState(running_context_lens=(400,) * 6, waiting_prompt_tokens=(300,), waiting_seconds=(0.01,))
BURST = LoadState(
    running_context_lens=(600,) * 24,
    waiting_prompt_tokens=(1500,) * 40,
    waiting_seconds=tuple(0.01 * i for i in range(40, 0, -1)),
)


class CountingGpu(SimulatedGpu):
    def __init__(self):
        super().__init__()
        self.locks: list[int] = []

    def lock_sm_clock(self, mhz: int) -> None:
        super().lock_sm_clock(mhz)
        self.locks.append(mhz)


def test_light_load_runs_below_the_top_clock_and_more_load_needs_more_clock():
    gov = governor("advise")
    light = gov.decide(LIGHT)
    assert 210 <= light < TOP_MHZ
    heavier = LoadState(running_context_lens=(1500,) * 48, waiting_prompt_tokens=(300,), waiting_seconds=(0.01,))
    assert light < gov.decide(heavier)


def test_the_chosen_clock_meets_the_slos_and_the_next_lower_one_would_not():
    gpu = SimulatedGpu()
    chosen = governor("advise", gpu).decide(LoadState(running_context_lens=(2000,) * 64))
    decode = IterationShape(decode_tokens=64, prefill_tokens=0, context_tokens=64 * 2000)
    budget = TPOT_SLO_MS / 1e3 * 0.9
    assert 210 < chosen < TOP_MHZ
    assert gpu.iteration_seconds(decode, chosen) <= budget * 1.02
    assert gpu.iteration_seconds(decode, chosen - 15) > budget * 0.98


def test_a_burst_returns_to_the_top_clock_within_one_interval():
    gov = governor("advise")
    assert gov.decide(LIGHT) < TOP_MHZ
    assert gov.decide(BURST) == TOP_MHZ
    assert gov.decide(LIGHT) < TOP_MHZ


def test_apply_locks_only_on_change_and_close_resets():
    gpu = CountingGpu()
    gov = governor("apply", gpu)
    target = gov.decide(LIGHT)
    gov.decide(LIGHT)
    assert gpu.locks == [target] and gpu.current_sm_clock_mhz() == target
    gov.decide(BURST)
    assert gpu.locks == [target, TOP_MHZ]
    gov.close()
    assert gpu.locked_mhz is None and gpu.current_sm_clock_mhz() == TOP_MHZ


def test_advise_computes_the_target_but_leaves_the_clock_alone():
    gpu = CountingGpu()
    gov = governor("advise", gpu)
    assert gov.decide(LIGHT) == gov.target_mhz < TOP_MHZ
    gov.close()
    assert gpu.locks == [] and gpu.current_sm_clock_mhz() == TOP_MHZ


def test_off_answers_the_top_clock_and_touches_nothing():
    gpu = CountingGpu()
    gov = governor("off", gpu)
    assert gov.decide(LIGHT) == TOP_MHZ and gov.target_mhz == TOP_MHZ
    gov.close()
    assert gpu.locks == []


def test_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        governor("turbo")


# -- a bursty trace through a continuous-batching loop --------------------------------------


@dataclass
class Request:
    arrival: float
    prompt: int
    output: int
    prefilled: int = 0
    generated: int = 0
    first_token: float | None = None
    finished: float | None = None

    def meets_slos(self) -> bool:
        ttft = self.first_token - self.arrival
        tpot = (self.finished - self.first_token) / max(1, self.output - 1)
        return ttft <= TTFT_SLO_MS / 1e3 and tpot <= TPOT_SLO_MS / 1e3


def bursty_trace(seed: int, duration_s: float) -> list[Request]:
    """Poisson arrivals at 3 req/s with 5 s bursts at 12 req/s every 25 s."""
    rng = np.random.default_rng(seed)
    requests, now = [], 0.0
    while True:
        rate = 12.0 if now % 25.0 >= 20.0 else 3.0
        now += rng.exponential(1.0 / rate)
        if now >= duration_s:
            return requests
        requests.append(Request(now, prompt=int(rng.integers(64, 1536)), output=int(rng.integers(8, 200))))


def serve(requests: list[Request], gpu: SimulatedGpu, gov: FrequencyGovernor | None):
    """Continuous batching on the simulated GPU; returns the simulated end time."""
    pending = deque(requests)
    waiting: list[Request] = []
    running: list[Request] = []
    recent_arrivals: deque[float] = deque()
    prompt_tokens_seen = seen = 0
    now, next_decision = 0.0, 0.0
    while pending or waiting or running:
        while pending and pending[0].arrival <= now:
            request = pending.popleft()
            waiting.append(request)
            recent_arrivals.append(request.arrival)
            prompt_tokens_seen += request.prompt
            seen += 1
        if not waiting and not running:
            gpu.idle(pending[0].arrival - now)
            now = pending[0].arrival
            continue
        while recent_arrivals and recent_arrivals[0] < now - 2.0:
            recent_arrivals.popleft()

        if gov is not None and now >= next_decision:
            # The projections an engine can make: arrivals at the rate of the last 2 s
            # with the mean prompt so far; each running sequence decoding at SLO pace.
            interval_s = gov.interval_s
            arriving = math.ceil(len(recent_arrivals) / 2.0 * interval_s)
            mean_prompt = prompt_tokens_seen / seen
            gov.decide(
                LoadState(
                    running_context_lens=tuple(r.prompt + r.generated for r in running),
                    waiting_prompt_tokens=tuple(r.prompt - r.prefilled for r in waiting),
                    waiting_seconds=tuple(now - r.arrival for r in waiting),
                    arriving_requests=arriving,
                    arriving_prompt_tokens=round(arriving * mean_prompt),
                    context_growth_tokens=len(running) * math.ceil(interval_s / (TPOT_SLO_MS / 1e3)),
                )
            )
            next_decision = now + interval_s

        # Decodes first, then first-come-first-served prefill chunks in what is left.
        left = MAX_BATCHED_TOKENS - len(running)
        decode_context = sum(r.prompt + r.generated for r in running)
        chunks = []
        for request in waiting:
            if left == 0 or len(running) + len(chunks) >= MAX_SEQS:
                break
            take = min(request.prompt - request.prefilled, left)
            chunks.append((request, take))
            left -= take
        prefill_context = sum(take * r.prefilled + take * (take + 1) // 2 for r, take in chunks)
        shape = IterationShape(
            decode_tokens=len(running),
            prefill_tokens=sum(take for _, take in chunks),
            context_tokens=decode_context + prefill_context,
            prefill_context_tokens=prefill_context,
        )
        seconds = gpu.run_iteration(shape)
        if gov is not None:
            gov.latency_model.observe(shape, seconds, gpu.current_sm_clock_mhz())
        now += seconds

        for request in list(running):
            request.generated += 1
            if request.generated == request.output:
                request.finished = now
                running.remove(request)
        for request, take in chunks:
            request.prefilled += take
            if request.prefilled == request.prompt:
                waiting.remove(request)
                request.first_token, request.generated = now, 1
                if request.output == 1:
                    request.finished = now
                else:
                    running.append(request)
    return now


def run_trace(seed: int, governed: bool) -> tuple[list[Request], SimulatedGpu, float]:
    requests, gpu = bursty_trace(seed, duration_s=75.0), SimulatedGpu()
    gov = None
    if governed:
        # A cold latency model: it starts from its prior and learns while serving.
        gov = FrequencyGovernor(
            gpu,
            LatencyModel(max_clock_mhz=TOP_MHZ),
            TTFT_SLO_MS,
            TPOT_SLO_MS,
            mode="apply",
            max_num_batched_tokens=MAX_BATCHED_TOKENS,
        )
    end = serve(requests, gpu, gov)
    if gov is not None:
        gov.close()
    return requests, gpu, end


@pytest.mark.parametrize("seed", [4, 7])
def test_bursty_trace_meets_slos_with_less_energy_than_the_top_clock(seed):
    governed, governed_gpu, governed_end = run_trace(seed, governed=True)
    top, top_gpu, top_end = run_trace(seed, governed=False)
    # Compare over the same span of time: the run that ends first idles until the other ends.
    end = max(governed_end, top_end)
    governed_gpu.idle(end - governed_end)
    top_gpu.idle(end - top_end)

    attainment = np.mean([r.meets_slos() for r in governed])
    saving = 1 - governed_gpu.total_energy_joules() / top_gpu.total_energy_joules()
    print(f"seed {seed}: {len(governed)} requests, attainment {attainment:.4f} "
          f"(top clock {np.mean([r.meets_slos() for r in top]):.4f}), energy saved {saving:.1%}")
    assert len(governed) > 250
    assert attainment >= 0.99
    assert saving > 0.15
    assert governed_gpu.locked_mhz is None
