"""What a unit of finetuning backward costs, measured on the units themselves.

The latency model fits every feature of an iteration at once from its total time. Next
to inference, backward slices nearly always come with a similar decode batch, so the
fit can split the iteration's time between the decodes and the backward in many ways
that sum right: on the 2-core machine it priced a layer-token at 0.19-0.23 ms where
the layers took 0.15 ms, and the backward allowance stopped one layer short in most
iterations. Timing each layer and loss pass where it runs gives the backward's price
directly, free of that confusion; the allowance is then spent at these prices.
"""

from __future__ import annotations

import statistics
from collections import deque

# Recent units whose median is the price: a layer is ~25 ms on the 2-core machine, so
# this spans a few iterations, and a host stall in one unit moves the median not at all.
WINDOW = 16


class BackwardCosts:
    def __init__(self) -> None:
        self._per_layer_token: deque[float] = deque(maxlen=WINDOW)
        self._per_loss_token: deque[float] = deque(maxlen=WINDOW)

    def record_layer(self, seconds: float, tokens: int) -> None:
        """One decoder layer of a `tokens`-long sequence, recomputed and backpropagated."""
        self._per_layer_token.append(seconds / tokens)

    def record_loss(self, seconds: float, tokens: int) -> None:
        """One loss-head pass over `tokens` target tokens."""
        self._per_loss_token.append(seconds / tokens)

    def per_layer_token(self, prior: float) -> float:
        """Median measured seconds per layer-token; `prior` until a layer was timed."""
        return statistics.median(self._per_layer_token) if self._per_layer_token else prior

    def per_loss_token(self, prior: float) -> float:
        """Median measured seconds per loss-head token; `prior` until a pass was timed."""
        return statistics.median(self._per_loss_token) if self._per_loss_token else prior
