"""`FrequencyGovernor`: the lowest SM clock that keeps TTFT and TPOT inside their SLOs.

After throttLL'eM (Kakolyris et al., arXiv 2408.05235): a serving GPU at its top
clock finishes most iterations well inside the latency targets, and the slack is
energy thrown away. Each control interval the engine hands the governor what it
knows about the near future (`LoadState`); the governor asks the latency model how
long the iterations that matter would take at each supported clock and picks the
lowest clock at which

- TPOT: the mean time between tokens over the interval fits in the TPOT SLO. It
  is a decode iteration of the projected batch (the running sequences, the waiting
  ones and the projected arrivals, at their projected context, plus the finetuning
  tokens the jobs want), stretched by the prefill work the interval must also fit:
  if prefilling the waiting and arriving prompts takes p seconds of an interval of
  I, the decodes get I - p and every token waits I / (I - p) times longer. A slow
  clock's long prefill chunks stall every running decode, so this, not the bare
  decode iteration, is what binds under a steady stream of arrivals.
- TTFT: every waiting request, served first come first served in prefill chunks
  next to the running decodes, gets its first token within the TTFT SLO counting
  the time it has already waited; projected arrivals join the end of the queue,

both with `margin` held back for prediction error and for what the interval
brings that the projection missed. A clock also has to run the longest iteration
the scheduler can form (the running decodes and a full token budget of prefill)
within one interval: otherwise a prompt arriving just after the decision starts an
iteration at that clock that outlasts the interval, and the governor cannot raise
the clock until it ends (on the simulated H100, one 1024-token chunk at 210 MHz
takes ~0.3 s). When no clock meets them (a queue is building faster than it
drains) the answer is the top clock, at once: energy is never bought with an SLO
miss the model can foresee.

Predicted times only grow as the clock falls (`LatencyModel.costs`), so the
lowest passing clock is found by bisection: a handful of vectorized evaluations
per decision, whatever the queue length.

Modes: `apply` locks the clock through the device (only when the target changes)
and `close()` unlocks it; `advise` computes and exposes `target_mhz` and touches
nothing; `off` always answers the top clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.latency_model import IterationShape, LatencyModel, causal_context
from engine.power.device import GpuDevice

MODES = ("off", "advise", "apply")


@dataclass(frozen=True)
class LoadState:
    """What the engine knows at the start of a control interval."""

    # Context length of each running (decoding) sequence.
    running_context_lens: tuple[int, ...] = ()
    # Prompt tokens still to prefill per request without its first token, oldest first,
    # and how long each of those requests has waited so far.
    waiting_prompt_tokens: tuple[int, ...] = ()
    waiting_seconds: tuple[float, ...] = ()
    # Requests expected to arrive during the interval, and their prompt tokens in total
    # (`load_projection`: the count rounded up, the tokens the expected ones).
    arriving_requests: int = 0
    arriving_prompt_tokens: int = 0
    # Projected growth of the batch's total context (KV) over the interval.
    context_growth_tokens: int = 0
    # Finetuning forward tokens per iteration the running jobs want.
    finetune_tokens: int = 0
    # The strictest SLOs among these requests, where requests set their own
    # (None: the governor's defaults hold).
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None

    def __post_init__(self) -> None:
        if len(self.waiting_prompt_tokens) != len(self.waiting_seconds):
            raise ValueError("waiting_prompt_tokens and waiting_seconds must pair up")
        counts = (self.arriving_requests, self.arriving_prompt_tokens, self.context_growth_tokens, self.finetune_tokens)
        if min(counts) < 0:
            raise ValueError("projected counts must be non-negative")
        if any(slo is not None and slo <= 0 for slo in (self.ttft_slo_ms, self.tpot_slo_ms)):
            raise ValueError("SLOs must be positive")


class _Checks:
    """One load state's TPOT and TTFT tests, evaluated per clock from the model's costs."""

    def __init__(
        self,
        load: LoadState,
        max_num_batched_tokens: int,
        interval_s: float,
        tpot_budget_s: float,
        ttft_budget_s: float,
    ):
        self.interval_s = interval_s
        self.tpot_budget_s, self.ttft_budget_s = tpot_budget_s, ttft_budget_s
        prompts = list(load.waiting_prompt_tokens)
        waited = list(load.waiting_seconds)
        if load.arriving_requests:
            share = load.arriving_prompt_tokens / load.arriving_requests
            prompts += [share] * load.arriving_requests
            waited += [0.0] * load.arriving_requests
        self.running = len(load.running_context_lens)
        self.running_context = sum(load.running_context_lens)

        p = np.array(prompts, dtype=np.float64)
        self.waited = np.array(waited, dtype=np.float64)
        # Request i gets its first token once the prompts up to and including its own
        # are prefilled, in iterations that also carry the running decodes.
        self.prefilled = np.cumsum(p)
        self.prompt_context = np.cumsum(causal_context(0, p))  # causal attention over each prompt
        self.iterations = np.ceil(self.prefilled / max(1, max_num_batched_tokens - self.running))

        total_prompt = int(p.sum())
        total_prompt_context = int(self.prompt_context[-1]) if len(p) else 0
        self.decode_shape = IterationShape(
            decode_tokens=self.running + len(p),
            prefill_tokens=0,
            context_tokens=self.running_context + total_prompt + load.context_growth_tokens,
            finetune_forward_tokens=load.finetune_tokens,
        ).features()
        # Prefill work alone: the iterations it rides in are counted as decode iterations.
        self.prefill_work = IterationShape(
            0, total_prompt, total_prompt_context, prefill_context_tokens=total_prompt_context
        ).features(iterations=0)
        # The longest iteration the scheduler can form: the running decodes and a
        # full token budget of prefill (a fresh prompt's first chunk). It must fit
        # in one interval at the chosen clock (see the module docstring).
        chunk = max(0, max_num_batched_tokens - self.running)
        chunk_context = causal_context(0, chunk)
        self.longest_iteration = IterationShape(
            decode_tokens=self.running,
            prefill_tokens=chunk,
            context_tokens=self.running_context + load.context_growth_tokens + chunk_context,
            prefill_context_tokens=chunk_context,
        ).features()

    def met(self, costs: np.ndarray) -> bool:
        if costs @ self.longest_iteration > self.interval_s:
            return False
        decodes_get = self.interval_s - costs @ self.prefill_work
        if decodes_get <= 0 or costs @ self.decode_shape * self.interval_s / decodes_get > self.tpot_budget_s:
            return False
        if not len(self.waited):
            return True
        fixed, decode, prefill, decode_context, prefill_context = costs[:5]
        ttft = (
            self.waited
            + self.iterations * (fixed + decode * self.running + decode_context * self.running_context)
            + prefill * self.prefilled
            + prefill_context * self.prompt_context
        )
        return bool(ttft.max() <= self.ttft_budget_s)


class FrequencyGovernor:
    def __init__(
        self,
        device: GpuDevice,
        latency_model: LatencyModel,
        ttft_slo_ms: float,
        tpot_slo_ms: float,
        margin: float = 0.1,
        mode: str = "advise",
        max_num_batched_tokens: int = 2048,
        interval_s: float = 0.1,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if ttft_slo_ms <= 0 or tpot_slo_ms <= 0:
            raise ValueError("SLOs must be positive")
        if not 0.0 <= margin < 1.0:
            raise ValueError("margin must lie in [0, 1)")
        if max_num_batched_tokens <= 0 or interval_s <= 0:
            raise ValueError("max_num_batched_tokens and interval_s must be positive")
        if mode != "off" and latency_model.max_clock_mhz is None:
            raise ValueError("the latency model needs max_clock_mhz to compare clocks")
        self.device = device
        self.latency_model = latency_model
        self.mode = mode
        self.max_num_batched_tokens = max_num_batched_tokens
        # How often `decide` is called; the projections in LoadState cover this span
        # and the longest iteration must fit in it. Requests arriving within an
        # interval are served at the clock chosen before they came, so a burst's
        # first prefills can run slow: a short interval keeps that to a few requests,
        # but a very short one leaves little room below the top clock. On the
        # simulated trace of bench/bench_power.py (seeds 1-3, 10 min each) deciding
        # every 0.25 s keeps 98.9-99.4% of requests within SLOs and saves 34-36% of
        # energy, every 0.1 s 99.8-100% and 27-28%, every 0.05 s 99.9% and 10%.
        self.interval_s = interval_s
        self.ttft_slo_ms, self.tpot_slo_ms = ttft_slo_ms, tpot_slo_ms
        self._keep = 1 - margin
        self._clocks = device.supported_sm_clocks_mhz()
        self.top_mhz = self._clocks[-1]
        self.target_mhz = self.top_mhz
        self._locked_mhz: int | None = None

    def decide(self, load: LoadState) -> int:
        """The SM clock for the next control interval, in MHz."""
        if self.mode == "off":
            return self.top_mhz
        self.target_mhz = self._lowest_clock(
            _Checks(
                load,
                self.max_num_batched_tokens,
                self.interval_s,
                (load.tpot_slo_ms or self.tpot_slo_ms) / 1e3 * self._keep,
                (load.ttft_slo_ms or self.ttft_slo_ms) / 1e3 * self._keep,
            )
        )
        if self.mode == "apply" and self.target_mhz != self._locked_mhz:
            self.device.lock_sm_clock(self.target_mhz)
            self._locked_mhz = self.target_mhz
        return self.target_mhz

    def _lowest_clock(self, checks: _Checks) -> int:
        def met(index: int) -> bool:
            return checks.met(self.latency_model.costs(self._clocks[index]))

        lo, hi = 0, len(self._clocks) - 1
        if not met(hi):
            return self.top_mhz
        while lo < hi:
            mid = (lo + hi) // 2
            if met(mid):
                hi = mid
            else:
                lo = mid + 1
        return self._clocks[lo]

    def close(self) -> None:
        """Give the clock back to the driver if this governor locked it."""
        if self._locked_mhz is not None:
            self.device.reset_sm_clock()
            self._locked_mhz = None
