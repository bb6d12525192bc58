"""Iteration latency model: how long one engine iteration takes, learned online.

The scheduler asks it how much finetuning fits next to the inference work of an
iteration within the TPOT SLO; the frequency governor asks it how slow a clock the
SLOs allow. Both need an answer in microseconds, for shapes the engine has not run
yet, on a machine whose speed drifts (other tenants, thermals, a new adapter mix).

Why a linear model. An iteration is one flat token batch, so its time is close to
a sum of costs: a fixed part (weights streamed once, launches, sampling), a cost
per decode / prefill / finetuning-forward token (the GEMMs), a cost per attended
context token, a cost per backward layer-token and one per token through the
finetuning loss head. Context is split in two because the two kinds differ by two
orders of magnitude: a decode token reads its whole KV history from HBM (~128 KiB
per context token for an 8B model, memory-bound), while a prefill chunk's queries
share each KV tile (flash attention), leaving ~1 ns of attention compute per
context token on an H100. throttLL'eM (Kakolyris et al.,
arXiv 2408.05235) fits gradient-boosted trees offline on a profiling sweep; we
have no offline sweep, so we fit few parameters online, and a linear model
extrapolates sanely to shapes it has not seen.

Why the clock enters as f_max / f. Each cost is split into a clock-independent
part (HBM traffic, host overhead: memory-bound decode barely slows at lower SM
clocks) and a compute-bound part that scales with cycle time, f_max / f. That gives
16 parameters: per feature x_i, time = sum_i x_i * (m_i + c_i * f_max / f). On the
CPU there is no clock and the factor is 1.

Why exponentially weighted ridge regression toward a prior, not plain recursive
least squares. Plain RLS with forgetting "winds up" in directions the data does
not excite (a clock never visited, finetuning that has not started): its
covariance grows without bound and one noisy sample then throws the estimate far
off. Here the data is forgotten at rate `forgetting` but the prior is not, so an
unexcited direction falls back to the prior instead of drifting, and the normal
equations (16 x 16) stay well conditioned. Solving them costs microseconds.

Why outliers are down-weighted (a Huber fit). An iteration now and then takes many
times its usual length for reasons no feature describes: the host steals the vCPU,
another process takes a core, the allocator faults in fresh pages. Measured on the
2-core CI machine, 8-16 of ~400 co-served iterations ran 0.1-2 s over their
prediction. In a least-squares fit each such iteration pulls every coefficient up
for the next hundred iterations (the forgetting horizon), so the scheduler leaves
tens of milliseconds of each TPOT budget unused. An observation whose error is
beyond `outlier_errors` times the median recent relative error, and beyond
`outlier_floor` of the prediction, is therefore weighted down so that it counts as
if it were on that threshold (Huber's loss). The floor keeps a fit that has seen
only regular iterations (a job training alone, errors of 1-3%) from discarding the
first iterations of a new mix as outliers: errors of tens of percent are what a
change of load looks like, and the fit must follow them at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

# Indices into IterationShape.features() and LatencyModel.costs().
(
    FIXED,
    DECODE,
    PREFILL,
    DECODE_CONTEXT,
    PREFILL_CONTEXT,
    FINETUNE_FORWARD,
    FINETUNE_BACKWARD,
    FINETUNE_LOSS,
) = range(8)
NUM_FEATURES = FINETUNE_LOSS + 1


def causal_context(start, count):
    """Context tokens that `count` new tokens at positions start..start+count-1 attend
    in all, causally (each itself and everything before it). Works on numpy arrays too."""
    return count * start + count * (count + 1) // 2


@dataclass(frozen=True)
class IterationShape:
    """What one iteration computes, in the units its cost scales with."""

    decode_tokens: int
    prefill_tokens: int
    # Sum over the batch of the context each new token attends to (itself included).
    context_tokens: int
    finetune_forward_tokens: int = 0
    # Layers x tokens recomputed and backpropagated by finetuning backward slices.
    finetune_backward_layer_tokens: int = 0
    # Tokens put through the loss head (final norm, vocabulary logits, cross-entropy
    # and its gradient) at the start of a backward: one such token costs about as
    # much as several backward layer-tokens on a small model, and it comes in a
    # burst per sequence, so it is a feature of its own.
    finetune_loss_tokens: int = 0
    # The part of context_tokens attended by prefill and finetuning-forward chunks;
    # the rest is attended by decodes (see the module docstring for why it matters).
    prefill_context_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prefill_context_tokens <= self.context_tokens:
            raise ValueError("prefill_context_tokens is a part of context_tokens")

    def features(self, iterations: int = 1) -> np.ndarray:
        """The regressors; `iterations` counts the fixed per-iteration cost (0: the
        work alone, to be added to iterations counted elsewhere)."""
        return np.array(
            [
                iterations,
                self.decode_tokens,
                self.prefill_tokens,
                self.context_tokens - self.prefill_context_tokens,
                self.prefill_context_tokens,
                self.finetune_forward_tokens,
                self.finetune_backward_layer_tokens,
                self.finetune_loss_tokens,
            ],
            dtype=np.float64,
        )


@dataclass(frozen=True)
class LatencyPrior:
    """What the model believes before it has measured anything.

    The defaults are a roofline estimate for a ~8B-parameter bf16 model on one
    H100 SXM (3.35 TB/s HBM3, 989 TFLOPS dense bf16, 1980 MHz boost: NVIDIA's
    figures as listed at glennklockwood.com/garden/processors/h100), at an assumed
    ~50% of peak FLOPs. They are assumptions meant to be the right order of
    magnitude; measurements replace them within tens of iterations. A CPU
    deployment should pass its own.
    """

    # Seconds per unit of each feature at the top clock.
    seconds: tuple[float, ...] = (
        6e-3,  # per iteration: 16 GB of weights / 3.35 TB/s ~ 4.8 ms, plus host overhead
        40e-6,  # per decode token: 16 GFLOP at ~50% of 989 TFLOPS ~ 32 us, plus sampling
        35e-6,  # per prefill token: the same GEMMs, no sampling
        4e-8,  # per decode context token: 128 KiB of KV (32 layers x 8 heads x 128 x K,V x 2 B) / 3.35 TB/s
        1e-9,  # per prefill context token: 4 x 4096 x 32 attention FLOPs at ~50% of 989 TFLOPS
        40e-6,  # per finetuning forward token: a prefill token that also keeps layer inputs
        3.3e-6,  # per backward layer-token: recompute + input gradient ~ 3x a forward layer
        4e-6,  # per loss token: logits and their input gradient, 2 x 2 x 4096 x 128k FLOPs at ~50%
    )
    # Part of each cost that scales with the SM cycle time.
    compute_fraction: tuple[float, ...] = (0.1, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9)
    # A typical per-iteration magnitude of each feature; it sets the prior's scale.
    typical: tuple[float, ...] = (1.0, 64.0, 512.0, 65536.0, 524288.0, 512.0, 4096.0, 128.0)
    # The prior counts as this many iterations of typical size in every direction:
    # weak, so that a few measurements override it where they are informative (real
    # batches make the features strongly collinear), yet it still holds the
    # directions the data never excites, like a clock not visited yet.
    weight: float = 0.05

    def __post_init__(self) -> None:
        for name in ("seconds", "compute_fraction", "typical"):
            if len(getattr(self, name)) != NUM_FEATURES:
                raise ValueError(f"LatencyPrior.{name} needs {NUM_FEATURES} values")
        if any(s < 0 for s in self.seconds):
            raise ValueError("LatencyPrior.seconds must be non-negative")
        if any(not 0.0 <= f <= 1.0 for f in self.compute_fraction):
            raise ValueError("LatencyPrior.compute_fraction values must lie in [0, 1]")
        if any(t <= 0 for t in self.typical) or self.weight <= 0:
            raise ValueError("LatencyPrior.typical and weight must be positive")


class LatencyModel:
    """Predicts an iteration's seconds from its shape and (on a GPU) the SM clock."""

    def __init__(
        self,
        prior: LatencyPrior = LatencyPrior(),
        max_clock_mhz: float | None = None,
        forgetting: float = 0.99,
        error_window: int = 100,
        outlier_errors: float = 3.0,
        outlier_floor: float = 0.3,
    ):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must lie in (0, 1]")
        if error_window <= 0:
            raise ValueError("error_window must be positive")
        if outlier_errors <= 0 or outlier_floor <= 0:
            raise ValueError("outlier_errors and outlier_floor must be positive")
        if max_clock_mhz is not None and max_clock_mhz <= 0:
            raise ValueError("max_clock_mhz must be positive")
        self.prior = prior
        self.max_clock_mhz = max_clock_mhz
        self.forgetting = forgetting
        self.outlier_errors = outlier_errors
        self.outlier_floor = outlier_floor
        # Features are divided by their typical size so that one prior weight fits all.
        self._scale = np.array(prior.typical)
        seconds, fraction = np.array(prior.seconds), np.array(prior.compute_fraction)
        self._theta_prior = np.concatenate([seconds * (1 - fraction), seconds * fraction]) * np.tile(self._scale, 2)
        self._gram = np.zeros((2 * NUM_FEATURES, 2 * NUM_FEATURES))
        self._moment = np.zeros(2 * NUM_FEATURES)
        self._theta = self._theta_prior.copy()
        self._stale = False
        self._errors: deque[float] = deque(maxlen=error_window)
        self.num_observations = 0

    # -- fitting -----------------------------------------------------------------

    def _slowdown(self, clock_mhz: float | None) -> float:
        if clock_mhz is None:
            return 1.0
        if self.max_clock_mhz is None:
            raise ValueError("a clock was given but the model has no max_clock_mhz")
        if clock_mhz <= 0:
            raise ValueError(f"clock must be positive, got {clock_mhz}")
        return self.max_clock_mhz / clock_mhz

    def _regressors(self, shape: IterationShape, clock_mhz: float | None) -> np.ndarray:
        z = shape.features() / self._scale
        return np.concatenate([z, z * self._slowdown(clock_mhz)])

    def observe(self, shape: IterationShape, seconds: float, clock_mhz: float | None = None) -> None:
        """Fold in one measured iteration, which ran at `clock_mhz` (None on the CPU)."""
        if not seconds > 0:
            raise ValueError(f"a measured iteration takes positive time, got {seconds}")
        # Scored before the update: the error metric is what the scheduler really got.
        predicted = self.predict(shape, clock_mhz)
        phi = self._regressors(shape, clock_mhz)
        weight = self._huber_weight(phi, predicted, seconds)
        self._errors.append(abs(predicted - seconds) / seconds)
        self._gram *= self.forgetting
        self._gram += weight * np.outer(phi, phi)
        self._moment *= self.forgetting
        self._moment += weight * phi * seconds
        self._stale = True
        self.num_observations += 1

    def _huber_weight(self, phi: np.ndarray, predicted: float, seconds: float) -> float:
        """1 for an ordinary observation; threshold / |error| beyond the outlier threshold.

        The threshold scales with the prediction's own uncertainty, sqrt(1 + leverage):
        an iteration of a kind the fit has barely seen (the first backward slices after
        hours of inference only) is new information, not an outlier, and counts fully.
        Until the error window is full the fit is still leaving its prior, whose errors
        say nothing about outliers, so every observation counts fully then too."""
        if len(self._errors) < self._errors.maxlen:
            return 1.0
        leverage = float(phi @ np.linalg.solve(self._gram + self.prior.weight * np.eye(len(phi)), phi))
        relative = max(self.outlier_errors * float(np.median(self._errors)), self.outlier_floor)
        threshold = relative * predicted * math.sqrt(1 + leverage)
        error = abs(seconds - predicted)
        return 1.0 if error <= threshold or threshold <= 0 else threshold / error

    def _parameters(self) -> np.ndarray:
        if self._stale:
            w = self.prior.weight
            self._theta = np.linalg.solve(
                self._gram + w * np.eye(2 * NUM_FEATURES), self._moment + w * self._theta_prior
            )
            self._stale = False
        return self._theta

    # -- prediction ----------------------------------------------------------------

    def costs(self, clock_mhz: float | None = None) -> np.ndarray:
        """Seconds per unit of each feature of `IterationShape.features()` at this clock.

        Each part is clamped at zero: no work takes negative time and a slower clock
        never makes work faster, even where noise has pushed a fitted coefficient
        below zero. So predictions never go negative and only grow with the work
        and with f_max / f, which the governor's search over clocks relies on.
        """
        theta = np.maximum(self._parameters(), 0.0)
        memory, compute = theta[:NUM_FEATURES], theta[NUM_FEATURES:]
        return (memory + compute * self._slowdown(clock_mhz)) / self._scale

    def predict(self, shape: IterationShape, clock_mhz: float | None = None) -> float:
        """Predicted seconds of one iteration of `shape` at `clock_mhz` (None: top clock or CPU)."""
        return float(self.costs(clock_mhz) @ shape.features())

    def max_finetune_tokens(
        self,
        shape: IterationShape,
        budget_s: float,
        clock_mhz: float | None = None,
        *,
        limit: int,
        context_per_token: float = 0.0,
    ) -> int:
        """Largest number of extra finetuning forward tokens that keeps the predicted
        time of `shape` plus them within `budget_s`, capped at `limit` (the token
        budget left in the iteration). Each token also attends to `context_per_token`
        context tokens (prefill-like): a chunk starting at position p attends
        ~p + n/2 per token.
        """
        spare = budget_s - self.predict(shape, clock_mhz)
        if spare <= 0 or limit <= 0:
            return 0
        costs = self.costs(clock_mhz)
        per_token = costs[FINETUNE_FORWARD] + context_per_token * costs[PREFILL_CONTEXT]
        if per_token <= 0:
            return limit
        return min(limit, math.floor(spare / per_token))

    # -- error report ------------------------------------------------------------------

    @property
    def last_error(self) -> float | None:
        """Relative error |predicted - measured| / measured of the latest observation."""
        return self._errors[-1] if self._errors else None

    @property
    def mean_error(self) -> float | None:
        """Mean relative error over the last `error_window` observations."""
        return sum(self._errors) / len(self._errors) if self._errors else None
