"""Latency model: online fit, forgetting, clock dependence, and the finetuning budget."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from engine.latency_model import IterationShape, LatencyModel, LatencyPrior
from engine.power.simulated_device import SimulatedGpu, SimulatedGpuConfig

pytestmark = pytest.mark.unit

# A CPU-sized machine, far from the default (H100) prior on purpose: seconds per
# iteration, decode token, prefill token, decode / prefill context token,
# finetuning forward token, backward layer-token, loss-head token.
CPU_COSTS = np.array([20e-3, 1.0e-3, 0.4e-3, 60e-9, 5e-9, 0.5e-3, 30e-6, 0.75e-3])


def random_shape(rng: np.random.Generator) -> IterationShape:
    decode = int(rng.integers(0, 96))
    prefill = int(rng.integers(1, 1024)) if rng.random() < 0.5 else 0
    finetune = int(rng.integers(1, 512)) if rng.random() < 0.4 else 0
    # Chunks start somewhere in their sequence: each token attends start + its index.
    prefill_context = prefill * int(rng.integers(0, 2048)) + prefill * (prefill + 1) // 2
    finetune_context = finetune * int(rng.integers(0, 1024)) + finetune * (finetune + 1) // 2
    decode_context = decode * int(rng.integers(16, 2048))
    chunk_context = prefill_context + finetune_context
    return IterationShape(
        decode_tokens=decode,
        prefill_tokens=prefill,
        context_tokens=decode_context + chunk_context,
        finetune_forward_tokens=finetune,
        finetune_backward_layer_tokens=int(rng.integers(0, 4096)) if rng.random() < 0.3 else 0,
        finetune_loss_tokens=int(rng.integers(1, 200)) if rng.random() < 0.1 else 0,
        prefill_context_tokens=chunk_context,
    )


def true_seconds(shape: IterationShape, costs=CPU_COSTS) -> float:
    return float(costs @ shape.features())


def mean_relative_error(model: LatencyModel, shapes, truth, clock_mhz=None) -> float:
    return float(np.mean([abs(model.predict(s, clock_mhz) - truth(s)) / truth(s) for s in shapes]))


def test_before_any_observation_the_prior_predicts_with_its_clock_split():
    prior = LatencyPrior()
    model = LatencyModel(prior, max_clock_mhz=2000)
    shape = IterationShape(decode_tokens=32, prefill_tokens=256, context_tokens=40_000, prefill_context_tokens=33_000)
    seconds, fraction = np.array(prior.seconds), np.array(prior.compute_fraction)
    at_half_clock = (seconds * (1 - fraction) + 2 * seconds * fraction) @ shape.features()
    assert model.predict(shape) == pytest.approx(float(seconds @ shape.features()))
    assert model.predict(shape, clock_mhz=1000) == pytest.approx(float(at_half_clock))
    assert model.mean_error is None and model.last_error is None


def test_fits_noisy_linear_data_within_a_few_percent():
    rng = np.random.default_rng(0)
    model = LatencyModel()
    for _ in range(400):
        shape = random_shape(rng)
        model.observe(shape, true_seconds(shape) * (1 + rng.normal(0, 0.02)))
    held_out = [random_shape(rng) for _ in range(200)]
    assert mean_relative_error(model, held_out, true_seconds) < 0.02
    # The reported error is the one-step-ahead error, so it includes the 2% noise.
    assert 0.01 < model.mean_error < 0.03
    assert model.num_observations == 400


def test_forgetting_adapts_after_a_regime_change():
    rng = np.random.default_rng(1)
    slower = CPU_COSTS * np.array([1.8, 1.5, 1.6, 1.2, 1.0, 1.6, 1.4, 1.3])
    forgetting, remembering = LatencyModel(), LatencyModel(forgetting=1.0)
    for _ in range(400):
        shape = random_shape(rng)
        for model in (forgetting, remembering):
            model.observe(shape, true_seconds(shape))
    before = forgetting.mean_error

    shape = random_shape(rng)
    forgetting.observe(shape, true_seconds(shape, slower))
    assert forgetting.last_error > 0.2  # the change shows in the error metric at once
    for _ in range(400):
        shape = random_shape(rng)
        for model in (forgetting, remembering):
            model.observe(shape, true_seconds(shape, slower))

    held_out = [random_shape(rng) for _ in range(200)]
    def truth(s):
        return true_seconds(s, slower)

    assert mean_relative_error(forgetting, held_out, truth) < 0.03
    assert forgetting.mean_error < 0.03 and before < 0.01
    # Without forgetting, the old regime keeps half the weight.
    assert mean_relative_error(remembering, held_out, truth) > 0.1


def gpu_shape(rng: np.random.Generator) -> IterationShape:
    """Shapes at H100 scale: many decodes, large prefill chunks."""
    shape = random_shape(rng)
    return dataclasses.replace(
        shape, decode_tokens=shape.decode_tokens * 2, context_tokens=shape.context_tokens + shape.decode_tokens * 512
    )


def test_learns_the_clock_dependence_of_the_simulated_gpu():
    rng = np.random.default_rng(2)
    gpu = SimulatedGpu(SimulatedGpuConfig(timing_noise=0.01, seed=2))
    clocks = gpu.supported_sm_clocks_mhz()
    model = LatencyModel(max_clock_mhz=clocks[-1])
    for _ in range(300):
        gpu.lock_sm_clock(int(rng.choice(clocks)))
        shape = gpu_shape(rng)
        model.observe(shape, gpu.run_iteration(shape), gpu.current_sm_clock_mhz())

    held_out = [gpu_shape(rng) for _ in range(100)]
    for mhz in (300, 900, 1980):
        truth = [gpu.iteration_seconds(s, mhz) for s in held_out]
        errors = [abs(model.predict(s, mhz) - t) / t for s, t in zip(held_out, truth)]
        assert np.mean(errors) < 0.03

    # What it learned is the physics: prefill slows with the clock, decode hardly does.
    decode = IterationShape(decode_tokens=64, prefill_tokens=0, context_tokens=64 * 800)
    prefill = IterationShape(0, 2048, 2048 * 2049 // 2, prefill_context_tokens=2048 * 2049 // 2)
    for shape in (decode, prefill):
        learned = model.predict(shape, 495) / model.predict(shape, 1980)
        actual = gpu.iteration_seconds(shape, 495) / gpu.iteration_seconds(shape, 1980)
        assert learned == pytest.approx(actual, rel=0.05)
    assert model.predict(prefill, 495) / model.predict(prefill, 1980) > 3.0
    assert model.predict(decode, 495) / model.predict(decode, 1980) < 1.6


def test_predictions_stay_physical_when_the_data_is_not():
    # Times that fall as prefill grows drive the raw prefill coefficient below zero.
    model = LatencyModel(max_clock_mhz=1980)
    rng = np.random.default_rng(3)
    for _ in range(200):
        prefill = int(rng.integers(0, 2048))
        shape = IterationShape(decode_tokens=8, prefill_tokens=prefill, context_tokens=4096)
        model.observe(shape, 0.05 - 1e-5 * prefill, int(rng.choice([600, 1200, 1980])))
    assert (model.costs(600) >= 0).all()
    for _ in range(100):
        shape = random_shape(rng)
        times = [model.predict(shape, mhz) for mhz in (300, 600, 1200, 1980)]
        assert times[-1] >= 0
        assert all(a >= b for a, b in itertools.pairwise(times))


def fitted_cpu_model() -> LatencyModel:
    rng = np.random.default_rng(4)
    model = LatencyModel()
    for _ in range(300):
        shape = random_shape(rng)
        model.observe(shape, true_seconds(shape))
    return model


def with_finetune(shape: IterationShape, tokens: int, context_per_token: float) -> IterationShape:
    context = round(tokens * context_per_token)
    return dataclasses.replace(
        shape,
        finetune_forward_tokens=shape.finetune_forward_tokens + tokens,
        context_tokens=shape.context_tokens + context,
        prefill_context_tokens=shape.prefill_context_tokens + context,
    )


def test_max_finetune_tokens_fills_the_budget_exactly():
    model = fitted_cpu_model()
    shape = IterationShape(decode_tokens=16, prefill_tokens=0, context_tokens=16 * 600)
    budget = 0.2
    n = model.max_finetune_tokens(shape, budget, limit=100_000, context_per_token=300)
    assert n > 0
    assert model.predict(with_finetune(shape, n, 300)) <= budget + 1e-12
    assert model.predict(with_finetune(shape, n + 1, 300)) > budget
    # Attending more context per token leaves room for fewer tokens.
    assert model.max_finetune_tokens(shape, budget, limit=100_000, context_per_token=3000) < n
    assert model.max_finetune_tokens(shape, budget, limit=10) == 10


def test_max_finetune_tokens_is_monotone_and_zero_over_budget():
    model = fitted_cpu_model()
    prefill_context = 128 * 129 // 2
    shape = IterationShape(32, 128, 32 * 900 + prefill_context, prefill_context_tokens=prefill_context)
    base = model.predict(shape)
    budgets = np.linspace(0.5 * base, 4 * base, 40)
    counts = [model.max_finetune_tokens(shape, b, limit=1_000_000) for b in budgets]
    assert all(a <= b for a, b in itertools.pairwise(counts))
    assert counts[0] == 0 and counts[-1] > 0
    assert model.max_finetune_tokens(shape, base * 0.999, limit=1_000_000) == 0


def test_max_finetune_tokens_shrinks_at_lower_clocks():
    rng = np.random.default_rng(5)
    gpu = SimulatedGpu()
    clocks = gpu.supported_sm_clocks_mhz()
    model = LatencyModel(max_clock_mhz=clocks[-1])
    for _ in range(200):
        gpu.lock_sm_clock(int(rng.choice(clocks)))
        shape = gpu_shape(rng)
        model.observe(shape, gpu.run_iteration(shape), gpu.current_sm_clock_mhz())
    shape = IterationShape(decode_tokens=48, prefill_tokens=0, context_tokens=48 * 1000)
    counts = [model.max_finetune_tokens(shape, 0.025, mhz, limit=8192) for mhz in (600, 1200, 1980)]
    assert 0 < counts[0] < counts[1] < counts[2]


def test_rejects_inconsistent_input():
    with pytest.raises(ValueError):
        LatencyModel().predict(IterationShape(1, 0, 10), clock_mhz=1000)  # no max clock known
    with pytest.raises(ValueError):
        LatencyModel().observe(IterationShape(1, 0, 10), 0.0)
    with pytest.raises(ValueError):
        IterationShape(1, 0, 10, prefill_context_tokens=11)


def _trained_pair(rng: np.random.Generator, shapes) -> tuple[LatencyModel, LatencyModel]:
    """The default (outlier-robust) model and a plain least-squares one, fed the same data."""
    robust, plain = LatencyModel(), LatencyModel(outlier_errors=1e12, outlier_floor=1e12)
    for shape in shapes:
        seconds = true_seconds(shape) * (1 + rng.normal(0, 0.02))
        robust.observe(shape, seconds)
        plain.observe(shape, seconds)
    return robust, plain


def test_a_stalled_iteration_barely_moves_the_fit():
    rng = np.random.default_rng(2)
    robust, plain = _trained_pair(rng, [random_shape(rng) for _ in range(300)])
    held_out = [random_shape(rng) for _ in range(200)]
    stalled = random_shape(rng)
    for model in (robust, plain):
        model.observe(stalled, true_seconds(stalled) + 2.0)  # the process lost its cores for 2 s
    assert mean_relative_error(robust, held_out, true_seconds) < 0.02
    # What the stall would have done to a least-squares fit: every prediction off.
    assert mean_relative_error(plain, held_out, true_seconds) > 0.1


def test_a_new_kind_of_iteration_is_learnt_not_taken_for_an_outlier():
    rng = np.random.default_rng(3)
    # Hours of inference only, then the first iterations with finetuning backward work.
    inference = [dataclasses.replace(random_shape(rng), finetune_forward_tokens=0, finetune_backward_layer_tokens=0,
                                     finetune_loss_tokens=0) for _ in range(300)]
    robust, plain = _trained_pair(rng, inference)
    backward = [dataclasses.replace(random_shape(rng), finetune_backward_layer_tokens=int(rng.integers(512, 4096)),
                                    finetune_loss_tokens=int(rng.integers(0, 128))) for _ in range(30)]
    first = backward[0]
    for model in (robust, plain):
        model.observe(first, true_seconds(first))
    # The first one is far off the fit (the prior's backward costs are an H100's) and
    # still counts as much as in a plain fit.
    robust_error = mean_relative_error(robust, backward[15:], true_seconds)
    assert robust_error <= 1.2 * mean_relative_error(plain, backward[15:], true_seconds)
    for shape in backward[1:15]:
        for model in (robust, plain):
            model.observe(shape, true_seconds(shape))
    assert mean_relative_error(robust, backward[15:], true_seconds) < 0.05


def test_a_change_of_load_after_regular_iterations_is_followed_at_once():
    # A job trained alone: the same iteration over and over, errors well under 1%.
    rng = np.random.default_rng(4)
    alone = IterationShape(0, 0, 150 * 151 // 2, finetune_forward_tokens=150, finetune_backward_layer_tokens=30 * 150,
                           finetune_loss_tokens=90, prefill_context_tokens=150 * 151 // 2)
    robust, plain = _trained_pair(rng, [alone] * 100 + [random_shape(rng) for _ in range(100)] + [alone] * 150)
    # Then inference arrives and the machine turns out 20% slower on the new mix.
    mixed = [random_shape(rng) for _ in range(60)]
    for shape in mixed[:20]:
        for model in (robust, plain):
            model.observe(shape, 1.2 * true_seconds(shape))
    # As fast as a plain fit (without the floor its errors here are ~1.4x the plain one's).
    slower = lambda s: 1.2 * true_seconds(s)
    assert mean_relative_error(robust, mixed[20:], slower) <= 1.1 * mean_relative_error(plain, mixed[20:], slower)
