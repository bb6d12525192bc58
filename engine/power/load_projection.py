"""What the next control interval will probably bring, for `FrequencyGovernor`.

The governor picks a clock for the next `interval_s` before it happens, so it needs
the load of that interval, not only the queue of this instant. The engine knows
the running sequences and the waiting requests; what it must guess is what arrives
meanwhile and how far the running contexts grow. `project_load` makes those two
guesses from what an engine can observe, cheaply enough to run every interval.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from engine.power.governor import LoadState


class ArrivalTracker:
    """Recent request arrivals, to project the next control interval's arrivals."""

    def __init__(self, window_s: float = 2.0):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        # A short window follows a burst within a second or two; a long one would
        # keep projecting a burst that is over, holding the clock up for nothing.
        self.window_s = window_s
        self._recent: deque[float] = deque()
        self._requests = 0
        self._prompt_tokens = 0

    def record(self, now: float, prompt_tokens: int) -> None:
        """One request arrived at `now` with `prompt_tokens` to prefill."""
        self._recent.append(now)
        self._requests += 1
        self._prompt_tokens += prompt_tokens

    def project(self, now: float, interval_s: float) -> tuple[int, int]:
        """(arriving_requests, arriving_prompt_tokens) expected in the next interval_s"""
        while self._recent and self._recent[0] < now - self.window_s:
            self._recent.popleft()
        if not self._requests:
            return 0, 0
        expected = len(self._recent) / self.window_s * interval_s
        # The mean prompt over every request seen, not only the window: a window
        # holds a handful of requests, and one long prompt would swing its mean.
        mean_prompt = self._prompt_tokens / self._requests
        # The prompt tokens are the expected ones, fractions of a request included:
        # the TPOT SLO is a mean over a request's life, many intervals, so the mean
        # prefill work is what its decodes must absorb. (Projecting a whole mean
        # prompt into every interval instead, at any rate, kept the clock ~300 MHz
        # higher for the same SLO attainment: bench/bench_power.py saved 18-21% of
        # the energy instead of 27-28%.)
        # The count is rounded up, so that the TTFT test always has the next
        # request in its queue and the clock is ready for it.
        return math.ceil(expected), round(expected * mean_prompt)


def project_load(
    now: float,
    running_context_lens: Sequence[int],
    waiting: Sequence[tuple[int, float]],
    arrivals: ArrivalTracker,
    interval_s: float,
    tpot_slo_s: float,
    finetune_tokens: int = 0,
) -> LoadState:
    """The `LoadState` of the interval starting at `now`.

    `waiting` holds, oldest first, each request without its first token: the prompt
    tokens it still has to prefill and its arrival time (on the clock of `now`).
    """
    if interval_s <= 0 or tpot_slo_s <= 0:
        raise ValueError("interval_s and tpot_slo_s must be positive")
    arriving_requests, arriving_prompt_tokens = arrivals.project(now, interval_s)
    # A running sequence grows by one token per decode. The governor aims at SLO
    # pace, one decode every tpot_slo_s; a clock fast enough to decode more often
    # has TPOT to spare, so this is the growth the decision has to allow for.
    decodes_per_sequence = math.ceil(interval_s / tpot_slo_s)
    return LoadState(
        running_context_lens=tuple(running_context_lens),
        waiting_prompt_tokens=tuple(tokens for tokens, _ in waiting),
        waiting_seconds=tuple(now - arrival for _, arrival in waiting),
        arriving_requests=arriving_requests,
        arriving_prompt_tokens=arriving_prompt_tokens,
        context_growth_tokens=len(running_context_lens) * decodes_per_sequence,
        finetune_tokens=finetune_tokens,
    )
