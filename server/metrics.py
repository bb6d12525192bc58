"""Prometheus exposition of the engine's latest iteration stats.

A collector reads `EngineClient.last_stats` at scrape time, so nothing has to update
gauges on the hot path and a scrape always sees the newest iteration.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine_client import EngineClient


class EngineStatsCollector(Collector):
    def __init__(self, engine: EngineClient, model_name: str):
        self._engine = engine
        self._labels = [model_name]

    def collect(self):
        stats = self._engine.last_stats
        gauges = [
            ("coserve:num_requests_running", "Sequences in the engine's running batch", stats and stats.num_running),
            ("coserve:num_requests_waiting", "Sequences waiting for a batch slot", stats and stats.num_waiting),
            ("coserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", stats and stats.kv_cache_usage),
            (
                "coserve:num_requests_waiting_for_lora_slot",
                "Waiting sequences whose LoRA adapter is not resident for compute yet",
                stats and stats.num_waiting_for_lora_slot,
            ),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(self._labels, value or 0)
            yield family
        preemptions = CounterMetricFamily(
            "coserve:num_preemptions", "Sequences preempted for lack of KV-cache blocks", labels=["model_name"]
        )
        preemptions.add_metric(self._labels, stats.num_preemptions if stats else 0)
        yield preemptions
        yield from self._per_adapter(stats)

    def _per_adapter(self, stats):
        """Sequences per LoRA adapter; the label set is bounded by the adapters loaded."""
        for state, counts in (("running", stats and stats.lora_running), ("waiting", stats and stats.lora_waiting)):
            family = GaugeMetricFamily(
                f"coserve:lora_requests_{state}", f"Sequences {state}, per LoRA adapter", labels=["model_name", "lora_name"]
            )
            for lora_name, count in (counts or {}).items():
                family.add_metric([*self._labels, lora_name], count)
            yield family


def make_registry(engine: EngineClient, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineStatsCollector(engine, model_name))
    return registry
