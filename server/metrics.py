"""`GET /metrics`: the series operators know from vLLM (under `coserve:`), and ours.

Two kinds of sources:
- events, counted as they happen: every engine iteration's stats (tokens by kind,
  iteration time measured and predicted, energy) and every request's timings
  (`server/request_metrics.py`); these feed counters and histograms, so nothing
  between two scrapes is lost;
- state, read at scrape time: queue lengths, KV-cache usage, adapters, finetuning
  jobs, clock and power. A collector reads the newest values then, so nothing has
  to update gauges on the hot path.

Buckets follow vLLM's so that dashboards built for it read ours. Labels are bounded:
`model_name` (the base model or an adapter), finish reasons, SLO kinds, token
kinds, job statuses, and job ids only of jobs running or paused. Two info gauges are
for routers rather than dashboards (see `StateCollector._router_info`): they carry
vLLM's label sets, adapter names and the KV cache's geometry.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.messages import IterationStats
from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.finetune.manager import JobManager
from server.request_metrics import FinishedRequest, RequestTracker
from server.settings import Settings

# vLLM's bucket choices (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# Iteration times span CPU (~10 ms to seconds) and GPU (~ms) engines.
ITERATION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                     2.5, 5.0, 10.0]
SHARE_BUCKETS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
ENERGY_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]
FINISH_REASONS = ("stop", "length", "abort", "error")
JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
# tokens_per_joule is taken over the iterations of this recent window.
_EFFICIENCY_WINDOW_S = 30.0


def build_1_2_5_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's buckets for token counts)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return buckets
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """The event-driven series, and the registry the scrape-time collector joins."""

    def __init__(self, model_name: str, max_model_len: int):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(name, doc, [*m, *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r)

        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = counter("coserve:prompt_tokens", "Prompt tokens of requests that got a first token")
        self.generation_tokens = counter("coserve:generation_tokens", "Tokens generated")
        self.request_success = counter(
            "coserve:request_success", "Finished requests by finish reason", ["finished_reason"]
        )
        self.ttft = histogram("coserve:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("coserve:inter_token_latency_seconds", "Time between two tokens of a request", ITL_BUCKETS)
        self.e2e = histogram("coserve:e2e_request_latency_seconds", "Arrival to last token", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram(
            "coserve:request_queue_time_seconds", "Arrival to first scheduled", REQUEST_LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram("coserve:request_prompt_tokens", "Prompt tokens per request",
                                               token_buckets)
        self.request_generation_tokens = histogram(
            "coserve:request_generation_tokens", "Generated tokens per request", token_buckets
        )
        self.slo_met = counter("coserve:slo_met_requests", "Judged requests that met an SLO", ["slo"])
        self.slo_evaluated = counter(
            "coserve:slo_evaluated_requests", "Requests judged against their SLOs (those that ran to the end)"
        )
        self.goodput_tokens = counter("coserve:goodput_tokens", "Generated tokens of requests that met both SLOs")
        self.finetune_tokens = counter(
            "coserve:finetune_tokens", "Finetuning tokens: forward, and backward through all layers", ["phase"]
        )
        self.iteration_tokens = counter("coserve:iteration_tokens", "Tokens computed in iterations, by kind", ["kind"])
        self.iteration_time = histogram("coserve:iteration_time_seconds", "Measured engine iteration time",
                                        ITERATION_BUCKETS)
        self.iteration_predicted = histogram(
            "coserve:iteration_predicted_time_seconds", "The latency model's prediction for each iteration",
            ITERATION_BUCKETS,
        )
        self.iteration_budget = histogram(
            "coserve:iteration_budget_seconds",
            "Time budget of iterations that run inference: the TPOT SLO paced per request, filled by finetuning",
            ITERATION_BUCKETS,
        )
        self.finetune_share = histogram(
            "coserve:iteration_finetune_share", "Finetuning tokens / all tokens, per iteration", SHARE_BUCKETS
        )
        # Power series are registered only once the engine reports a power device.
        self.energy: Counter | None = None
        self.finetune_energy: Counter | None = None
        self.request_energy: Histogram | None = None
        self._recent_efficiency: deque[tuple[float, float, float]] = deque()  # (time, tokens, joules)
        # The newest real iteration (the engine also sends state-only stats between them).
        self.latest_iteration: IterationStats | None = None

        labels = [model_name]
        # Every label value exists from the start, so a panel shows 0 instead of "no data".
        for reason in FINISH_REASONS:
            self.request_success.labels(*labels, reason)
        for slo in ("ttft", "tpot", "both"):
            self.slo_met.labels(*labels, slo)
        for phase in ("forward", "backward"):
            self.finetune_tokens.labels(*labels, phase)
        for kind in ("decode", "prefill", "finetune"):
            self.iteration_tokens.labels(*labels, kind)
        self.slo_evaluated.labels(*labels)
        self.goodput_tokens.labels(*labels)

    def enable_power(self) -> None:
        m = ["model_name"]
        self.energy = Counter("coserve:gpu_energy_joules", "Accelerator energy spent in engine iterations", m,
                              registry=self.registry)
        self.finetune_energy = Counter("coserve:finetune_energy_joules", "The finetuning share of that energy", m,
                                       registry=self.registry)
        self.request_energy = Histogram("coserve:request_energy_joules", "Energy attributed to each finished request",
                                        m, buckets=ENERGY_BUCKETS, registry=self.registry)
        self.energy.labels(self.model_name)
        self.finetune_energy.labels(self.model_name)

    # -- request events (RequestTracker's sink) ------------------------------------------

    def first_token(self, model_name: str, ttft_s: float, prompt_tokens: int) -> None:
        self.ttft.labels(model_name).observe(ttft_s)
        self.prompt_tokens.labels(model_name).inc(prompt_tokens)

    def inter_token(self, model_name: str, seconds: float) -> None:
        self.itl.labels(model_name).observe(seconds)

    def generated(self, model_name: str, tokens: int) -> None:
        self.generation_tokens.labels(model_name).inc(tokens)

    def finished(self, request: FinishedRequest) -> None:
        name = request.model_name
        self.request_success.labels(name, request.finish_reason).inc()
        self.e2e.labels(name).observe(request.e2e_seconds)
        self.request_prompt_tokens.labels(name).observe(request.prompt_tokens)
        self.request_generation_tokens.labels(name).observe(request.generation_tokens)
        if request.queued_seconds is not None:
            self.queue.labels(name).observe(request.queued_seconds)
        if request.energy_joules is not None and self.request_energy is not None:
            self.request_energy.labels(name).observe(request.energy_joules)
        if request.judged:
            self.slo_evaluated.labels(name).inc()
            for slo, met in (("ttft", request.meets_ttft), ("tpot", request.meets_tpot),
                             ("both", request.meets_ttft and request.meets_tpot)):
                if met:
                    self.slo_met.labels(name, slo).inc()
            if request.meets_ttft and request.meets_tpot:
                self.goodput_tokens.labels(name).inc(request.generation_tokens)

    # -- engine iterations ------------------------------------------------------------------

    def iteration(self, stats: IterationStats) -> None:
        if stats.iteration_seconds <= 0:
            return  # a state report between iterations, not an iteration
        self.latest_iteration = stats
        name = self.model_name
        self.iteration_time.labels(name).observe(stats.iteration_seconds)
        self.iteration_predicted.labels(name).observe(stats.predicted_seconds)
        if stats.budget_seconds is not None:
            self.iteration_budget.labels(name).observe(stats.budget_seconds)
        self.iteration_tokens.labels(name, "decode").inc(stats.decode_tokens)
        self.iteration_tokens.labels(name, "prefill").inc(stats.prefill_tokens)
        self.iteration_tokens.labels(name, "finetune").inc(stats.finetune_forward_tokens)
        self.finetune_tokens.labels(name, "forward").inc(stats.finetune_forward_tokens)
        self.finetune_tokens.labels(name, "backward").inc(stats.finetune_backward_tokens)
        if stats.num_batched_tokens:
            self.finetune_share.labels(name).observe(stats.finetune_forward_tokens / stats.num_batched_tokens)
        if stats.energy_joules is not None and self.energy is not None:
            self.energy.labels(name).inc(stats.energy_joules)
            self.finetune_energy.labels(name).inc(stats.finetune_energy_joules or 0.0)
            now = time.monotonic()
            self._recent_efficiency.append((now, stats.num_batched_tokens, stats.energy_joules))
            while self._recent_efficiency[0][0] < now - _EFFICIENCY_WINDOW_S:
                self._recent_efficiency.popleft()

    def tokens_per_joule(self) -> float | None:
        joules = sum(j for _, _, j in self._recent_efficiency)
        return sum(t for _, t, _ in self._recent_efficiency) / joules if joules > 0 else None


class StateCollector(Collector):
    """Gauges read at scrape time from the engine's newest stats and the job manager."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, jobs: JobManager, adapters: AdapterRegistry,
                 max_loras: int):
        self._engine = engine
        self._adapters = adapters
        self._max_loras = max_loras
        self._metrics = metrics
        self._jobs = jobs
        self._labels = [metrics.model_name]

    def _gauge(self, name: str, doc: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(self._labels, value or 0)
        return family

    def collect(self):
        stats = self._engine.last_stats
        iteration = self._metrics.latest_iteration
        yield self._gauge("coserve:num_requests_running", "Sequences in the engine's running batch",
                          stats and stats.num_running)
        yield self._gauge("coserve:num_requests_waiting", "Sequences waiting for a batch slot",
                          stats and stats.num_waiting)
        yield self._gauge("coserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
                          stats and stats.kv_cache_usage)
        yield self._gauge("coserve:num_requests_waiting_for_lora_slot",
                          "Waiting sequences whose LoRA adapter is not resident for compute yet",
                          stats and stats.num_waiting_for_lora_slot)
        yield self._gauge("coserve:latency_model_relative_error",
                          "Mean |predicted - measured| / measured iteration time, recent iterations",
                          iteration and iteration.latency_model_error)
        preemptions = CounterMetricFamily(
            "coserve:num_preemptions", "Sequences preempted for lack of KV-cache blocks", labels=["model_name"]
        )
        preemptions.add_metric(self._labels, stats.num_preemptions if stats else 0)
        yield preemptions
        yield from self._prefix_cache(stats)
        yield from self._per_adapter(stats)
        yield from self._router_info(stats)
        yield from self._finetune_jobs()
        yield from self._power(iteration)

    def _prefix_cache(self, stats):
        """Prefix-cache counters (tokens, in vLLM's meaning: hits / queries is the hit
        rate) and the KV that requests' kv_ttl keeps pinned."""
        for name, doc, field in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
            ("prefix_cache_evictions", "Cached KV blocks evicted for new contents", "prefix_cache_evictions"),
            ("kv_pins", "Finished requests whose KV was pinned for their kv_ttl", "kv_pins"),
            ("kv_pins_refused", "kv_ttl pins not made because max_pinned_kv_fraction was reached",
             "kv_pins_refused"),
            ("kv_pin_expiries", "kv_ttl pins that ran out", "kv_pin_expiries"),
        ):
            family = CounterMetricFamily(f"coserve:{name}", doc, labels=["model_name"])
            family.add_metric(self._labels, getattr(stats, field) if stats else 0)
            yield family
        yield self._gauge("coserve:kv_pinned_blocks", "KV-cache blocks held by kv_ttl pins",
                          stats and stats.kv_pinned_blocks)

    def _per_adapter(self, stats):
        """Sequences per LoRA adapter, zero for adapters without any; the label set is
        bounded by the adapters loaded (an unloaded one stays while its requests finish)."""
        for state, counts in (("running", stats and stats.lora_running), ("waiting", stats and stats.lora_waiting)):
            family = GaugeMetricFamily(
                f"coserve:lora_requests_{state}", f"Sequences {state}, per LoRA adapter",
                labels=["model_name", "lora_name"],
            )
            counts = dict.fromkeys(self._adapters.cards, 0) | (counts or {})
            for lora_name, count in counts.items():
                family.add_metric([*self._labels, lora_name], count)
            yield family

    def _router_info(self, stats):
        """What an endpoint picker (Gateway API Inference Extension, llm-d) reads besides
        the waiting, running and KV-usage gauges, in vLLM's label format. The LoRA gauge
        names the adapters with sequences running and waiting (comma-separated, as vLLM
        does) and how many adapters fit in a batch; its value is when it was read, which
        the picker uses to take the newest of several series. The cache gauge gives the
        KV block geometry that prefix-cache-aware scoring needs."""
        running = sorted(name for name, n in (stats.lora_running if stats else {}).items() if n)
        waiting = sorted(name for name, n in (stats.lora_waiting if stats else {}).items() if n)
        lora = GaugeMetricFamily(
            "coserve:lora_requests_info",
            "Adapters with running and waiting sequences, and max_lora; the value is the time of the reading",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric([str(self._max_loras), ",".join(running), ",".join(waiting)], time.time())
        yield lora
        ready = self._engine.ready
        cache = GaugeMetricFamily("coserve:cache_config_info", "KV-cache geometry (always 1)",
                                  labels=["block_size", "num_gpu_blocks"])
        cache.add_metric([str(ready.block_size), str(ready.num_kv_blocks)], 1)
        yield cache

    def _finetune_jobs(self):
        jobs = GaugeMetricFamily("coserve:finetune_jobs", "Finetuning jobs by status", labels=["model_name", "status"])
        counts = self._jobs.store.jobs.count_by_status()
        for status in JOB_STATUSES:
            jobs.add_metric([*self._labels, status], counts.get(status, 0))
        yield jobs
        steps = CounterMetricFamily("coserve:finetune_steps", "Optimizer steps of all jobs since start-up",
                                    labels=["model_name"])
        steps.add_metric(self._labels, self._jobs.steps_reported)
        yield steps
        loss = GaugeMetricFamily("coserve:finetune_job_loss", "Latest training loss of each running or paused job",
                                 labels=["model_name", "job_id"])
        progress = GaugeMetricFamily("coserve:finetune_job_progress", "Optimizer steps done / total (0-1)",
                                     labels=["model_name", "job_id"])
        energy = GaugeMetricFamily("coserve:finetune_job_energy_joules",
                                   "Energy attributed to each running or paused job so far (with a power device)",
                                   labels=["model_name", "job_id"])
        for job_id, (job_loss, job_progress, job_energy) in self._jobs.progress.items():
            loss.add_metric([*self._labels, job_id], job_loss)
            progress.add_metric([*self._labels, job_id], job_progress)
            if job_energy is not None:
                energy.add_metric([*self._labels, job_id], job_energy)
        yield loss
        yield progress
        yield energy

    def _power(self, iteration: IterationStats | None):
        ready = self._engine.ready
        if ready is None or ready.power_device is None:
            return
        info = GaugeMetricFamily("coserve:power_mode_info", "Frequency governor mode and the device it watches",
                                 labels=["model_name", "mode", "device"])
        info.add_metric([*self._labels, ready.power_mode, ready.power_device], 1)
        yield info
        yield self._gauge("coserve:gpu_sm_clock_mhz", "SM clock of the latest iteration",
                          iteration and iteration.sm_clock_mhz)
        yield self._gauge("coserve:gpu_target_sm_clock_mhz", "SM clock the governor chose",
                          iteration and iteration.target_sm_clock_mhz)
        yield self._gauge("coserve:gpu_power_watts", "Board power", iteration and iteration.power_watts)
        yield self._gauge("coserve:tokens_per_joule",
                          f"Tokens computed (prompt, generated, finetuning) per joule over the last "
                          f"{_EFFICIENCY_WINDOW_S:.0f} s of iterations", self._metrics.tokens_per_joule())


def install_metrics(
    engine: EngineClient, jobs: JobManager, adapters: AdapterRegistry, model_name: str, settings: Settings
) -> CollectorRegistry:
    """Hook the metrics onto the engine client's events; returns the registry /metrics serves."""
    metrics = ServerMetrics(model_name, engine.ready.max_model_len)
    if engine.ready.power_device is not None:
        metrics.enable_power()
    engine.requests = RequestTracker(metrics, model_name, settings.ttft_slo_ms, settings.tpot_slo_ms)
    engine.on_stats = metrics.iteration
    metrics.registry.register(StateCollector(engine, metrics, jobs, adapters, settings.max_loras))
    return metrics.registry
