"""`SimulatedGpu`: an H100-like card whose iteration time and power follow its SM clock.

It lets the governor be tested, and what-if studies be run, on machines without a
GPU. It is never used unless asked for. The model is deliberately simple, and each
constant says where it comes from; "assumption" marks the ones no source gave us.

Time. An iteration is a clock-independent memory-bound part (weights and KV cache
streamed from HBM, host overhead) plus a compute-bound part (GEMM and attention
FLOPs) that stretches by f_max / f. Decode at serving batch sizes is dominated by
the first, prefill by the second: Splitwise (Patel et al., ISCA 2024, arXiv
2311.18677) calls prompt computation compute-intensive and token generation
memory-intensive, and Maliakel et al. (arXiv 2501.08219) find the decode phase
"largely insensitive to GPU frequency".

Power. Idle power, plus HBM power while streaming, plus SM dynamic power that
scales as f * V(f)^2 with the voltage falling linearly towards the lowest clock.
The three terms are solved from three published points (idle, memory-bound decode
at the top clock and at a low clock) and the board limit (compute-bound at the top
clock). For compute-bound work this gives the U-shaped energy-versus-clock curve
that throttLL'eM (Kakolyris et al., arXiv 2408.05235) and others report: lower
clocks save energy until the longer run time outweighs the lower power.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.latency_model import IterationShape


@dataclass(frozen=True)
class SimulatedGpuConfig:
    # H100 SXM clock range: ~210 MHz idle floor to the 1980 MHz boost clock
    # (factryze.ai/glossary/sm-clock; 1.98 GHz also at glennklockwood.com/garden/processors/h100).
    min_clock_mhz: int = 210
    max_clock_mhz: int = 1980
    # Assumption: NVIDIA's supported-clock lists step by 15 MHz on recent cards.
    clock_step_mhz: int = 15

    # H100 SXM peak HBM3 bandwidth and dense bf16 tensor throughput
    # (NVIDIA's figures as listed at glennklockwood.com/garden/processors/h100).
    hbm_bytes_per_s: float = 3.35e12
    peak_flops: float = 989.4e12
    # Assumptions: fractions of those peaks that serving kernels reach.
    memory_efficiency: float = 0.8
    compute_efficiency: float = 0.5
    # Assumption: launches, sampling and host sync per iteration, clock-independent.
    overhead_s: float = 1e-3

    # The model served, Llama-3-8B-like: parameters, bf16, 32 layers, hidden 4096,
    # KV per token = 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes.
    params: float = 8.0e9
    bytes_per_param: int = 2
    num_layers: int = 32
    hidden_size: int = 4096
    vocab_size: int = 128256
    kv_bytes_per_token: int = 131072

    # Idle power: 80.3 W measured on an idle H200 SXM (api.serialalice.pt
    # alice-benchmark); the H200 is the same Hopper die, so we take it for the H100.
    idle_watts: float = 80.3
    # H100 SXM board power limit, 700 W (glennklockwood.com, NVIDIA's datasheet);
    # assumption: compute-bound prefill at the top clock runs at it.
    tdp_watts: float = 700.0
    # Memory-bound decode draws 137-300 W on a 700 W H200 at default clocks, and
    # locking the SM clock recovers up to 32% of decode energy at minimal throughput
    # loss (Ma et al., "The Illusion of Power Capping in LLM Decode", arXiv
    # 2605.11999). We take the top of the range for a batched decode, and read the
    # 32% as the power saved by the lowest clock (assumption: where in the range
    # they found it is not stated in what we read).
    memory_bound_watts: float = 300.0
    memory_bound_saving_at_min_clock: float = 0.32
    # Assumption: core voltage at the lowest clock relative to the top one.
    min_voltage_fraction: float = 0.65

    # Relative standard deviation of measured iteration times, for fitting tests.
    timing_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_clock_mhz < self.max_clock_mhz or self.clock_step_mhz <= 0:
            raise ValueError("need 0 < min_clock_mhz < max_clock_mhz and a positive clock step")
        if (self.max_clock_mhz - self.min_clock_mhz) % self.clock_step_mhz:
            raise ValueError("the clock range must be a whole number of steps")


class SimulatedGpu:
    """Implements `GpuDevice`, plus `run_iteration` and `idle` to advance simulated time."""

    # Assumption: flash attention's query tile; a prefill chunk reads each KV tile
    # once per this many queries, where a decode token reads its whole history.
    QUERY_TILE = 128

    def __init__(self, config: SimulatedGpuConfig = SimulatedGpuConfig()):
        c = self.config = config
        self.name = "simulated H100 SXM"
        self._clocks = list(range(c.min_clock_mhz, c.max_clock_mhz + 1, c.clock_step_mhz))
        self._clock = c.max_clock_mhz
        self.locked_mhz: int | None = None
        self._rng = np.random.default_rng(c.seed)
        self.elapsed_s = 0.0
        self._energy_j = 0.0
        self._power_w = c.idle_watts
        # Solve the power terms from the calibration points (see the config).
        self._sm_compute_watts = c.tdp_watts - c.idle_watts
        saving = c.memory_bound_watts * c.memory_bound_saving_at_min_clock
        self._sm_memory_watts = saving / (1 - self._dynamic_factor(c.min_clock_mhz))
        self._hbm_watts = c.memory_bound_watts - c.idle_watts - self._sm_memory_watts
        if self._hbm_watts < 0:
            raise ValueError("memory-bound power and its saving leave no HBM power above idle")

    # -- the physics ---------------------------------------------------------------

    def _dynamic_factor(self, mhz: float) -> float:
        """SM dynamic power relative to the top clock: f * V(f)^2."""
        c = self.config
        v = c.min_voltage_fraction + (1 - c.min_voltage_fraction) * (mhz - c.min_clock_mhz) / (
            c.max_clock_mhz - c.min_clock_mhz
        )
        return mhz / c.max_clock_mhz * v * v

    def _phases(self, shape: IterationShape, mhz: float) -> tuple[float, float]:
        """(memory-bound seconds, compute-bound seconds) of `shape` at `mhz`."""
        c = self.config
        decode_context = shape.context_tokens - shape.prefill_context_tokens
        kv_read = decode_context + shape.prefill_context_tokens / self.QUERY_TILE
        streamed = c.params * c.bytes_per_param + kv_read * c.kv_bytes_per_token
        memory = c.overhead_s + streamed / (c.hbm_bytes_per_s * c.memory_efficiency)
        tokens = shape.decode_tokens + shape.prefill_tokens + shape.finetune_forward_tokens
        flops = (
            2 * c.params * tokens
            # QK^T and PV: 4 * hidden FLOPs per layer per attended context token.
            + 4 * c.hidden_size * c.num_layers * shape.context_tokens
            # Frozen base weights: recompute (2) and input gradient (2), no weight gradient.
            + 4 * c.params / c.num_layers * shape.finetune_backward_layer_tokens
            # Loss head: vocabulary logits and their input gradient.
            + 4 * c.hidden_size * c.vocab_size * shape.finetune_loss_tokens
        )
        compute = flops / (c.peak_flops * c.compute_efficiency) * c.max_clock_mhz / mhz
        return memory, compute

    def iteration_seconds(self, shape: IterationShape, mhz: float | None = None) -> float:
        """Noise-free time of `shape` at `mhz` (default: the current clock)."""
        return sum(self._phases(shape, self._clock if mhz is None else mhz))

    def run_iteration(self, shape: IterationShape) -> float:
        """Run `shape` at the current clock: advances time and energy, returns seconds."""
        memory, compute = self._phases(shape, self._clock)
        if self.config.timing_noise:
            jitter = max(0.5, 1 + self._rng.normal(0.0, self.config.timing_noise))
            memory, compute = memory * jitter, compute * jitter
        g = self._dynamic_factor(self._clock)
        joules = (
            self.config.idle_watts * (memory + compute)
            + (self._hbm_watts + self._sm_memory_watts * g) * memory
            + self._sm_compute_watts * g * compute
        )
        self._advance(memory + compute, joules)
        return memory + compute

    def idle(self, seconds: float) -> None:
        """Let `seconds` pass with nothing running."""
        if seconds > 0:
            self._advance(seconds, self.config.idle_watts * seconds)

    def _advance(self, seconds: float, joules: float) -> None:
        self.elapsed_s += seconds
        self._energy_j += joules
        self._power_w = joules / seconds

    # -- GpuDevice -----------------------------------------------------------------------

    def supported_sm_clocks_mhz(self) -> list[int]:
        return list(self._clocks)

    def current_sm_clock_mhz(self) -> int:
        return self._clock

    def power_watts(self) -> float:
        """Average power over the last iteration or idle period."""
        return self._power_w

    def total_energy_joules(self) -> float:
        return self._energy_j

    def lock_sm_clock(self, mhz: int) -> None:
        if mhz not in self._clocks:
            raise ValueError(f"{mhz} MHz is not a supported SM clock")
        self._clock = self.locked_mhz = mhz

    def reset_sm_clock(self) -> None:
        # Unlocked, a busy card boosts to its top clock.
        self._clock = self.config.max_clock_mhz
        self.locked_mhz = None

    def clock_event_reasons(self) -> list[str]:
        return ["user_defined_clocks"] if self._clock < self.config.max_clock_mhz else []
