"""The time budget of each decoding iteration, paced so that every request's mean
inter-token time holds its target.

A request's TPOT is the mean gap between its tokens over its whole decode, and every
iteration that decodes adds one gap to each running request. So the SLO binds each
request's mean interval, not each interval: an iteration that ends short of its budget
(the next backward layer did not fit, no finetuning work was ready) leaves time that
later iterations may spend, and one that ran long is paid back by later ones. The pacer
keeps that balance per request, the sum of (measured interval - target) over the gaps
it has seen, and budgets the next iteration for the request with the least time in
hand. Per request, not per iteration: the credit that short iterations built up for
requests that have since finished is not spent on newcomers (a per-iteration balance
let requests at 1 req/s on the 2-core machine average 190 ms against an engine average
of 173 ms). Measured intervals run from one iteration's start to the next one's, so the
engine loop's own overhead is paid for too, and a latency model biased either way is
corrected. Every interval is charged in full, a host stall of seconds too: the client
counts it in the request's mean, and paying it back is cheap (an iteration without
finetuning decodes in a fraction of the target). Capping the charge at two targets let
1.2 s stalls every 12 s (10% of the CPU) lift TPOTs to 196 ms against a 190 ms target
at 0.5 req/s on the 2-core machine; charged in full they held 187-193 ms.
"""

from __future__ import annotations

# Fraction of the TPOT SLO the mean interval is held below: room for the last gaps of a
# request, which it has no later iterations to pay back with, and for delivery jitter.
SLO_MARGIN = 0.05
# How far past the SLO one iteration may run on time that earlier ones left unused, in
# SLOs. Work comes in whole units (a backward layer is ~25 ms against a 200 ms SLO on the
# 2-core machine), so a budget that could never exceed the SLO could never average it.
BURST = 0.25


def target(tpot_slo_s: float) -> float:
    return tpot_slo_s * (1 - SLO_MARGIN)


class TpotPacer:
    def __init__(self) -> None:
        # Per decoding request: (its TPOT SLO, sum of (interval - target) over its gaps).
        self.balances: dict[str, tuple[float, float]] = {}
        self._last_start: float | None = None

    def tick(self, now: float, decoding: dict[str, float]) -> None:
        """An iteration starts at `now` (perf_counter seconds) and decodes for the requests
        in `decoding` (request id -> TPOT SLO in seconds). Those that also decoded in the
        previous iteration are charged the gap since it began."""
        interval = None if self._last_start is None else now - self._last_start
        balances = {}
        for request_id, slo in decoding.items():
            previous = self.balances.get(request_id)
            if previous is None or interval is None:
                balances[request_id] = (slo, 0.0)
                continue
            balances[request_id] = (slo, previous[1] + interval - target(previous[0]))
        self.balances = balances
        self._last_start = now if decoding else None

    def budget(self, tpot_slo_s: float) -> float:
        """Seconds the next iteration may take. With requests decoding: the least of their
        targets less what each owes (plus what each has in hand), never below zero nor
        more than BURST past the strictest SLO; else the target of `tpot_slo_s` (the
        plan's strictest)."""
        if not self.balances:
            return target(tpot_slo_s)
        in_hand = min(target(slo) - balance for slo, balance in self.balances.values())
        strictest = min(slo for slo, _ in self.balances.values())
        return min((1 + BURST) * strictest, max(0.0, in_hand))
