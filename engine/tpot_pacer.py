"""The time budget of each decoding iteration, paced so that mean inter-token time holds
its target.

A request's TPOT is the mean gap between its tokens over its whole decode, and every
iteration that decodes adds one gap to each running request. So the SLO binds the mean
iteration interval, not each interval: an iteration that ends short of its budget (the
next backward layer did not fit, the latency model over-predicted, no finetuning work
was ready) leaves time that the next iterations may spend, and one that ran long is paid
back by the next ones. The pacer keeps that balance as a leaky sum of (measured interval
- target) over recent decoding iterations and takes it off the next budget. Measured
intervals run from one iteration's start to the next one's, so the engine loop's own
overhead is paid for too, and a latency model that is biased either way is corrected.
"""

from __future__ import annotations

# Fraction of the TPOT SLO the mean interval is held below: room for the spread of a
# request's own mean around the engine's (a request sees only its own ~100 gaps).
SLO_MARGIN = 0.05
# Weight of the balance carried into the next iteration: ~20 iterations of memory, short
# against a request's hundred-odd tokens. A steady shortfall w per iteration (whole
# layers, a high price) settles at w (1 - MEMORY) / (2 - MEMORY) below the target: ~5%.
MEMORY = 0.95
# Most of one interval's error carried in the balance, in targets. Over: a host stall of
# seconds is not the finetuning's doing, and paying it back in full would starve
# finetuning for dozens of iterations to move each request's mean by a few ms. Under: an
# iteration with nothing to add (no finetuning work ready) banks no more than this.
MAX_ERROR = 0.5
# How far past the SLO one iteration may run on time that earlier ones left unused, in
# SLOs. Work comes in whole units (a backward layer is ~25 ms against a 200 ms SLO on the
# 2-core machine), so a budget that can never exceed the SLO could never average it.
BURST = 0.25


class TpotPacer:
    def __init__(self) -> None:
        self.balance_s = 0.0  # leaky sum of (interval - target) over decoding iterations
        self._last_start: float | None = None
        self._last_target_s = 0.0

    @staticmethod
    def target(tpot_slo_s: float) -> float:
        return tpot_slo_s * (1 - SLO_MARGIN)

    def tick(self, now: float, tpot_slo_s: float | None) -> None:
        """An iteration starts at `now` (perf_counter seconds); `tpot_slo_s`: the strictest
        TPOT SLO of the requests it decodes for, None if it decodes for none. The gap
        since the previous decoding iteration began is that iteration's interval."""
        if tpot_slo_s is None:
            # No request is mid-decode: no one's mean carries over.
            self.balance_s, self._last_start = 0.0, None
            return
        if self._last_start is not None:
            target = self._last_target_s
            error = now - self._last_start - target
            self.balance_s = MEMORY * self.balance_s + max(-MAX_ERROR * target, min(error, MAX_ERROR * target))
        self._last_start, self._last_target_s = now, self.target(tpot_slo_s)

    def budget(self, tpot_slo_s: float) -> float:
        """Seconds the next iteration may take: the target less the balance owed (plus the
        credit left), never below zero nor more than BURST past the SLO."""
        return min((1 + BURST) * tpot_slo_s, max(0.0, self.target(tpot_slo_s) - self.balance_s))
