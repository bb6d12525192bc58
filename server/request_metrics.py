"""Per-request latency bookkeeping: TTFT, inter-token latency, end-to-end, SLO verdicts.

Times are taken where the server receives the engine's outputs, so they include
the engine <-> server hop a client also waits for. Every engine request is
followed from `start` to exactly one `finish`, whichever way it ends: the engine's
final output, a stop string the server matched, the client leaving, or the engine
dying.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.messages import EngineRequest, RequestOutput


@dataclass
class FinishedRequest:
    """What the metrics need about one request once it ended."""

    model_name: str
    finish_reason: str  # stop | length | abort | error
    prompt_tokens: int
    generation_tokens: int
    e2e_seconds: float
    ttft_seconds: float | None  # None: it ended before its first token
    queued_seconds: float | None
    energy_joules: float | None
    ttft_slo_s: float
    tpot_slo_s: float

    @property
    def tpot_seconds(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.ttft_seconds is None or self.generation_tokens < 2:
            return None
        return (self.e2e_seconds - self.ttft_seconds) / (self.generation_tokens - 1)

    @property
    def judged(self) -> bool:
        """Only requests that ran to their end are judged against SLOs; an abort or error says nothing."""
        return self.finish_reason in ("stop", "length") and self.ttft_seconds is not None

    @property
    def meets_ttft(self) -> bool:
        return self.ttft_seconds is not None and self.ttft_seconds <= self.ttft_slo_s

    @property
    def meets_tpot(self) -> bool:
        tpot = self.tpot_seconds
        return tpot is None or tpot <= self.tpot_slo_s


@dataclass
class _Running:
    model_name: str
    arrival: float
    prompt_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float
    last_token_at: float | None = None
    first_token_at: float | None = None
    generation_tokens: int = 0
    queued_seconds: float | None = None
    energy_joules: float | None = None


class RequestTracker:
    """Follows engine requests; reports tokens and inter-token gaps as they come and
    each request once it ends, to `sink` (the server's metrics)."""

    def __init__(self, sink, base_model_name: str, ttft_slo_ms: float, tpot_slo_ms: float):
        self._sink = sink
        self._base = base_model_name
        self._ttft_slo_s, self._tpot_slo_s = ttft_slo_ms / 1000, tpot_slo_ms / 1000
        self._running: dict[str, _Running] = {}

    def start(self, request: EngineRequest) -> None:
        ttft = request.ttft_slo_ms / 1000 if request.ttft_slo_ms is not None else self._ttft_slo_s
        tpot = request.tpot_slo_ms / 1000 if request.tpot_slo_ms is not None else self._tpot_slo_s
        self._running[request.request_id] = _Running(
            request.lora_name or self._base, request.arrival_time, len(request.prompt_token_ids), ttft, tpot
        )

    def on_output(self, output: RequestOutput) -> None:
        entry = self._running.get(output.request_id)
        if entry is None:
            return
        now = time.time()
        if output.new_token_ids:
            if entry.first_token_at is None:
                entry.first_token_at = now
                self._sink.first_token(entry.model_name, now - entry.arrival, entry.prompt_tokens)
            else:
                self._sink.inter_token(entry.model_name, now - entry.last_token_at)
            entry.last_token_at = now
            entry.generation_tokens += len(output.new_token_ids)
            self._sink.generated(entry.model_name, len(output.new_token_ids))
        if output.queued_seconds is not None:
            entry.queued_seconds = output.queued_seconds
        if output.energy_joules is not None:
            entry.energy_joules = output.energy_joules
        if output.finish_reason is not None:
            self.finish(output.request_id, output.finish_reason)

    def finish(self, request_id: str, reason: str) -> None:
        entry = self._running.pop(request_id, None)
        if entry is None:
            return
        self._sink.finished(
            FinishedRequest(
                model_name=entry.model_name,
                finish_reason=reason,
                prompt_tokens=entry.prompt_tokens,
                generation_tokens=entry.generation_tokens,
                e2e_seconds=(entry.last_token_at or time.time()) - entry.arrival,
                ttft_seconds=None if entry.first_token_at is None else entry.first_token_at - entry.arrival,
                queued_seconds=entry.queued_seconds,
                energy_joules=entry.energy_joules,
                ttft_slo_s=entry.ttft_slo_s,
                tpot_slo_s=entry.tpot_slo_s,
            )
        )

    def finish_all(self, reason: str) -> None:
        for request_id in list(self._running):
            self.finish(request_id, reason)
