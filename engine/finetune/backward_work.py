"""How much finetuning backward an iteration did, and how much it may do.

A training sequence's backward is two kinds of work, done in order: the loss head
(final norm, vocabulary logits, cross-entropy and its gradient) over the tokens
that carry a target, then the decoder layers from the top, each recomputed from its
saved input. The engine gives each iteration an allowance of both: the time its TPOT
budget has left once the iteration's forward has run, priced at what recent units
measured (backward_costs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The loss head runs over at least this many target tokens at a time (unless fewer
# are left): each pass streams the whole [vocab, hidden] head matrix twice
# (logits and their input gradient), which only pays off over enough rows.
LOSS_TOKENS_PER_PASS = 32


@dataclass(frozen=True)
class BackwardWork:
    """Backward work done (or reserved) in one iteration."""

    layer_tokens: int = 0  # layers x tokens recomputed and backpropagated
    loss_tokens: int = 0  # target tokens put through the loss head

    def __add__(self, other: BackwardWork) -> BackwardWork:
        return BackwardWork(self.layer_tokens + other.layer_tokens, self.loss_tokens + other.loss_tokens)


@dataclass(frozen=True)
class BackwardAllowance:
    """The backward an iteration may run.

    `max_layers`: layers in all, over every job (None: no limit, whole backwards).
    `seconds`: predicted time the backward may take (None: no limit), priced at
    `seconds_per_layer_token` and `seconds_per_loss_token` (measured on recent units).
    Loss tokens go in passes of `loss_tokens_per_pass`.
    """

    max_layers: int | None = None
    seconds: float | None = None
    seconds_per_layer_token: float = 0.0
    seconds_per_loss_token: float = 0.0
    loss_tokens_per_pass: int = LOSS_TOKENS_PER_PASS

    def seconds_for(self, work: BackwardWork) -> float:
        """Predicted seconds of `work` at this allowance's prices."""
        return work.layer_tokens * self.seconds_per_layer_token + work.loss_tokens * self.seconds_per_loss_token

    def loss_tokens(self, seconds: float | None, pending: int) -> int:
        """Of `pending` loss tokens, those that fit in `seconds`: whole passes, or all
        that are left."""
        if seconds is None or self.seconds_per_loss_token <= 0:
            return pending
        fit = _units(seconds, self.seconds_per_loss_token)
        return pending if fit >= pending else fit - fit % self.loss_tokens_per_pass

    def layers(self, seconds: float | None, max_layers: int | None, tokens: int) -> int | None:
        """Layers of a `tokens`-long sequence that fit in `seconds`, at most `max_layers`
        (None: no limit)."""
        if seconds is None or self.seconds_per_layer_token <= 0:
            return max_layers
        fit = _units(seconds, self.seconds_per_layer_token * tokens)
        return fit if max_layers is None else min(max_layers, fit)


def _units(seconds: float, seconds_per_unit: float) -> int:
    """Whole units of work that fit in `seconds` (a hair of slack absorbs float rounding:
    1.0 s at 0.01 s each is 100 units, not 99)."""
    return max(0, math.floor(seconds / seconds_per_unit * (1 + 1e-9)))
