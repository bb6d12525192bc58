"""Which GEMM this CPU runs fastest for this model's linear layers, measured once.

The answer differs by CPU, and no flag predicts it. On a 2-core Xeon with AMX
(2026-12-06, torch 2.13), the linears of one SmolLM2-135M step took, in ms:

    rows                      1      8     32    128
    float32 (MKL packed)   22.2   33.3   52.7  161.6
    bfloat16 (oneDNN)      23.6   25.3   28.7   48.3
    bf16 panels, fp32 math 11.6   19.5      -      -

while on a 2-core AMD EPYC with AVX512-BF16 but no AMX, bfloat16 GEMMs were about
2.5x float32 at 32 rows and more, and slower below 16. So `dtype: auto` on a CPU
times the candidates on this model's own layer shapes, at a few row counts:

  * the compute type (weights and activations): float32 or bfloat16, whichever GEMM
    runs the whole range faster (the sum over the row counts, the best GEMM of each
    type at each count);
  * the largest call (up to 16 rows with AVX-512, 128 with AVX2) that reads bfloat16
    panels with float32 arithmetic (csrc/cpu/bf16_linear.cpp) instead: it streams the
    weights once per call, which is all a decode step of a few rows does, and its AVX2
    tiles run near the FMA peak. On a 2-core AMD EPYC with AVX2 only (2026-12-07) the
    panels took 7.8/14.0/20.6 ms at 1/8/16 rows against 16.1/24.9/34.7 for float32 on
    oneDNN-packed weights; timed side by side, 50.8/101.7/194.5 at 32/64/128 rows
    against 57.8/112.5/189.6: up to 64;
  * the largest call that runs oneDNN on weights packed once rather than re-laid out
    per call (engine/model/packed_linear.py): for bfloat16 on the Xeon above, 30-40%
    faster from 1 to 128 rows; for float32 on the AMD EPYC below, 20-40% less time than
    MKL's best (packed or plain) from 1 to 64 rows, 12% less at 128 and 256;
  * then, for the chosen type, the smallest prefill chunk (128, 256 or 512 rows) at
    which its GEMM runs at full rate, within 10% of the best time per row: the
    scheduler packs prefills to that size (engine/scheduler.py). On a 2-core AMD EPYC
    with AVX2 only (2026-12-07; bfloat16 there is emulated, 5.6x float32 at 128 rows,
    so the probe keeps float32), plain float32 linears of SmolLM2-135M took 1.70/1.51/1.34
    ms per row at 128/256/512 rows: packed to 512; with the float32 weights packed for
    oneDNN up to 128 or 256 rows, 1.26-1.36 at all three: 128. On the Xeon above the
    packed bfloat16 linears took 0.21/0.20 ms per row at 128/256 rows and plain ones 0.20
    at 1,024 (engine/model/packed_linear.py): by those timings, 128.

The probe takes ~5 s on the 2-core Xeon and 40-80 s on the 2-core AMD EPYC with AVX2
(2026-12-07; its emulated bfloat16 GEMMs 15-20 s of that), so its result is kept in
a small JSON file keyed by the CPU, torch, the thread count and the shapes; a CPU that
differs probes anew.
`python -m engine.model.gemm_probe` prints the measurement for the default model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from engine import ops
from engine.model.llama import head_dim_of
from engine.model.packed_linear import (
    MKL_PACKED_MAX_ROWS,
    mkl_linear,
    mkl_pack,
    mkl_packing_available,
    onednn_linear,
    onednn_pack,
    onednn_packing_available,
)

log = logging.getLogger(__name__)

# Row counts timed for the compute type: one decode, a small batch, a busy one, a full one.
DTYPE_ROWS = (1, 8, 32, 128)
# Row counts at which the panel kernel is tried against the compute type's GEMM, up
# to the most this build's kernel takes (16 with AVX-512, 128 with AVX2).
PANEL_ROWS = (1, 2, 4, 8, 12, 16, 32, 64, 128)
# A further row count at which weights packed for oneDNN are tried against plain calls
# (the compute type is decided on DTYPE_ROWS): a decode batch with a prefill chunk beside
# it. On the Xeon packed bfloat16 weights won up to 256 rows (30 layers' linears 50.6
# against 62.1 ms) and lost from 384 (81.0 against 73.5); on the AMD EPYC packed float32
# weights won at 256 (486 against 554) and lost at 512 (948 against 888).
PACKED_ROWS = (256,)
# Prefill chunk sizes timed for the chosen type, and how close to the best time per row
# one must come to count as full rate.
PREFILL_ROWS = (128, 256, 512)
FULL_RATE_SLACK = 0.10
# Layers timed: enough of them to stream weights from memory as a real step does
# (the working set of a few layers would sit in cache), at most this many bytes.
_MAX_PROBE_BYTES = 256 * 2**20
_REPEATS = 3
# Calls of each of two kernels timed in turn where one is to replace the other.
_SIDE_BY_SIDE_ROUNDS = 5
# Part of the cache key: a probe that measures other candidates decides anew.
_CANDIDATES = "float32, bfloat16, both oneDNN-packed to 256 rows, panels to 128 side by side for the type, prefill 128-512 rows as run"


@dataclass(frozen=True)
class GemmChoice:
    dtype: str  # "float32" or "bfloat16": weights and activations
    panel_max_rows: int  # calls of up to this many rows read bfloat16 panels; 0 = never
    # Calls of up to this many rows (past the panels') run on oneDNN-packed weights; 0 = never.
    packed_max_rows: int
    # Prefills are packed to this many tokens an iteration (engine/scheduler.py).
    prefill_pack_rows: int
    # Milliseconds for the timed layers, per candidate and row count (for logs and docs);
    # the panels' as their GEMM's times the median ratio of the two timed side by side.
    timings_ms: dict[str, dict[str, float]]


def linear_shapes(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's fused linears (engine/model/llama.py), then the LM head's."""
    hidden = config.hidden_size
    head_dim = head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter), (config.vocab_size, hidden)]


def best_ms(step, repeats: int = _REPEATS) -> float:
    """The fastest of `repeats` timed calls of `step`, in ms, after one warm-up call."""
    step()  # warm-up: first-call costs (oneDNN primitive creation, page faults)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best * 1000


class _Layers:
    """Random weights of the model's shapes: `num_layers` copies of the layer's linears plus the LM head."""

    def __init__(self, layer_shapes: list[tuple[int, int]], head_shape: tuple[int, int], num_layers: int):
        shapes = layer_shapes * num_layers + [head_shape]
        self.fp32 = [torch.randn(n, k) * 0.02 for n, k in shapes]
        self.bf16 = [w.to(torch.bfloat16) for w in self.fp32]
        self.mkl = [mkl_pack(w) for w in self.fp32] if mkl_packing_available(self.fp32[0]) else None
        self.onednn = {
            dtype: [onednn_pack(w) for w in weights]
            for dtype, weights in (("float32", self.fp32), ("bfloat16", self.bf16))
            if onednn_packing_available(weights[0])
        }
        self.panels = None

    def inputs(self, rows: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        return {k: torch.randn(rows, k, dtype=dtype) for k in {w.shape[1] for w in self.fp32}}

    def _weights(self, dtype: str) -> list[torch.Tensor]:
        return self.fp32 if dtype == "float32" else self.bf16

    def plain_step(self, rows: int, dtype: str):
        """One call of every linear as `F.linear` runs it, in `dtype`."""
        weights = self._weights(dtype)
        x = self.inputs(rows, weights[0].dtype)
        return lambda: [F.linear(x[w.shape[1]], w) for w in weights]

    def mkl_step(self, rows: int):
        """One call of every linear on MKL-packed float32 weights."""
        x = self.inputs(rows, torch.float32)
        return lambda: [mkl_linear(x[w.shape[1]], p, w, None) for w, p in zip(self.fp32, self.mkl)]

    def onednn_step(self, rows: int, dtype: str):
        """One call of every linear on oneDNN-packed weights of `dtype`."""
        x = self.inputs(rows, getattr(torch, dtype))
        return lambda: [onednn_linear(x[w.shape[1]], p, None) for w, p in zip(self._weights(dtype), self.onednn[dtype])]

    def float32_plain_ms(self, rows: int) -> float:
        return best_ms(self.plain_step(rows, "float32"))

    def float32_ms(self, rows: int) -> float:
        """float32 without oneDNN: the faster of plain and MKL-packed calls, where those serve."""
        plain = self.float32_plain_ms(rows)
        if self.mkl is None or rows > MKL_PACKED_MAX_ROWS:
            return plain
        return min(plain, best_ms(self.mkl_step(rows)))

    def bfloat16_ms(self, rows: int) -> float:
        return best_ms(self.plain_step(rows, "bfloat16"))

    def onednn_ms(self, rows: int, dtype: str) -> float | None:
        """oneDNN on packed weights of `dtype`; None where it does not pack them."""
        if dtype not in self.onednn:
            return None
        return best_ms(self.onednn_step(rows, dtype))

    def prefill_ms(self, rows: int, dtype: str, packed_max_rows: int) -> float:
        """The type's GEMM at a prefill chunk's rows, as the engine runs it: oneDNN-packed
        up to `packed_max_rows`, plain above (float32: MKL-packed weights serve calls of at
        most 64 rows, engine/model/packed_linear.py)."""
        if rows <= packed_max_rows:
            return self.onednn_ms(rows, dtype)
        return self.float32_plain_ms(rows) if dtype == "float32" else self.bfloat16_ms(rows)

    def gemm_step(self, kind: str, rows: int):
        """One call of a GEMM as PackedLinear runs it, `kind` as `measure` keys it:
        float32 (MKL-packed weights up to 64 rows where MKL packs, plain above), bfloat16,
        or either oneDNN-packed."""
        if kind.endswith("-onednn"):
            return self.onednn_step(rows, kind.removesuffix("-onednn"))
        if kind == "float32" and self.mkl is not None and rows <= MKL_PACKED_MAX_ROWS:
            return self.mkl_step(rows)
        return self.plain_step(rows, kind)

    def panels_step(self, rows: int, dtype: torch.dtype):
        """One call of the panel kernel as PackedLinear runs it for a model of `dtype` (casts included)."""
        if self.panels is None:
            self.panels = [ops.pack_bf16_weight(w) for w in self.bf16]
        x = self.inputs(rows, dtype)
        return lambda: [
            ops.bf16_linear(x[w.shape[1]].float(), p, w.shape[0], None).to(dtype) for w, p in zip(self.bf16, self.panels)
        ]


def side_by_side_ms(step_a, step_b, rounds: int = _SIDE_BY_SIDE_ROUNDS) -> tuple[float, float, float]:
    """(best ms of a, best ms of b, median of a / b over the rounds): the two called in
    turn, once each per round, after a warm-up call of each. The host's speed drifts
    over seconds; a ratio of neighbouring calls is not moved by it, a best-of-N kept
    from different moments is."""
    step_a(), step_b()
    times_a, times_b = [], []
    for _ in range(rounds):
        for step, times in ((step_a, times_a), (step_b, times_b)):
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1000)
    ratios = sorted(a / b for a, b in zip(times_a, times_b))
    return min(times_a), min(times_b), ratios[len(ratios) // 2]


def measure(config: PretrainedConfig, panels_available: bool) -> GemmChoice:
    """Time the candidates on this machine now (5-80 s on 2 cores) and pick."""
    *layer_shapes, head_shape = linear_shapes(config)
    layer_bytes = 4 * sum(n * k for n, k in layer_shapes)
    num_layers = max(1, min(config.num_hidden_layers, _MAX_PROBE_BYTES // layer_bytes))
    layers = _Layers(layer_shapes, head_shape, num_layers)
    timings: dict[str, dict[str, float]] = {
        "float32": {}, "bfloat16": {}, "float32-onednn": {}, "bfloat16-onednn": {}, "panels": {}
    }
    for rows in sorted(set(DTYPE_ROWS) | set(PANEL_ROWS) | set(PACKED_ROWS)):
        timings["float32"][str(rows)] = layers.float32_ms(rows)
        timings["bfloat16"][str(rows)] = layers.bfloat16_ms(rows)
        for dtype in ("float32", "bfloat16"):
            packed = layers.onednn_ms(rows, dtype)
            if packed is not None:
                timings[f"{dtype}-onednn"][str(rows)] = packed
    # The type first: the panels do not weigh in it (_types), so they are timed for the
    # chosen type only (on the AMD EPYC that skips the side-by-side calls of emulated
    # bfloat16 GEMMs, about 15 s by their timings; the probe took 45 s at 11:58).
    dtype, _, packed_max_rows = _types(timings)
    if panels_available:
        for rows in (r for r in PANEL_ROWS if r <= ops.bf16_linear_max_rows()):
            # Panels and the GEMM they would replace, side by side: timed in separate
            # sweeps, each at its best, the choice moved between starts (panels to 32,
            # 64 or 128 rows on the AMD EPYC) with the host's drift.
            kind = f"{dtype}-onednn" if rows <= packed_max_rows else dtype
            _, gemm, ratio = side_by_side_ms(
                layers.panels_step(rows, getattr(torch, dtype)), layers.gemm_step(kind, rows)
            )
            # Recorded as the GEMM's best time scaled by the median ratio, so that the
            # choice (_types) compares what was measured side by side.
            timings[kind][str(rows)] = gemm
            timings["panels"][f"{dtype}/{rows}"] = gemm * ratio
            if ratio >= 1:
                break  # the GEMM wins from here on: it only gets better per row
    dtype, panel_max_rows, packed_max_rows = _types(timings)
    # Row counts already timed as the engine runs them (128, 256) are not timed again.
    gemm = _gemm(timings, dtype)[1]
    timings["prefill"] = {
        str(rows): timings["panels"][f"{dtype}/{rows}"] if rows <= panel_max_rows
        else gemm.get(str(rows)) or layers.prefill_ms(rows, dtype, packed_max_rows)
        for rows in PREFILL_ROWS
    }
    return pick(timings)


def _gemm(timings: dict[str, dict[str, float]], dtype: str) -> tuple[int, dict[str, float]]:
    """(packed_max_rows, ms per row count) of the type's GEMM as the engine would run it:
    oneDNN-packed weights up to the largest row count where they beat the call without
    them, that call above."""
    plain = timings[dtype]
    packed = timings.get(f"{dtype}-onednn", {})
    wins = [int(rows) for rows, ms in packed.items() if ms < plain[rows]]
    packed_max_rows = max(wins, default=0)
    return packed_max_rows, {rows: packed[rows] if int(rows) <= packed_max_rows else ms for rows, ms in plain.items()}


def pick(timings: dict[str, dict[str, float]]) -> GemmChoice:
    """The choice the timings (ms, as `measure` records them) call for: the types (see
    _types), then the smallest prefill chunk whose time per row is within
    FULL_RATE_SLACK of the best."""
    dtype, panel_max_rows, packed_max_rows = _types(timings)
    per_row = {rows: timings["prefill"][str(rows)] / rows for rows in PREFILL_ROWS}
    best = min(per_row.values())
    pack_rows = next(rows for rows in PREFILL_ROWS if per_row[rows] <= (1 + FULL_RATE_SLACK) * best)
    return GemmChoice(dtype, panel_max_rows, packed_max_rows, pack_rows, timings)


def _types(timings: dict[str, dict[str, float]]) -> tuple[str, int, int]:
    """(dtype, panel_max_rows, packed_max_rows): the type whose GEMM (oneDNN-packed or
    not, see _gemm) takes the least time summed over DTYPE_ROWS (float32 on a tie); then,
    for it, panels up to the last row count where they beat that GEMM without a loss
    before. The panels do not weigh in the type: they are one kernel for either type
    (the types' timings differ by casts only), and where they reach far (128 rows with
    AVX2) the types would be told apart by those casts alone."""
    dtype = min(("float32", "bfloat16"), key=lambda t: sum(_gemm(timings, t)[1][str(rows)] for rows in DTYPE_ROWS))
    packed_max_rows, gemm = _gemm(timings, dtype)
    panel_max_rows = 0
    for rows in PANEL_ROWS:
        panels = timings["panels"].get(f"{dtype}/{rows}")
        if panels is None or panels >= gemm[str(rows)]:
            break
        panel_max_rows = rows
    return dtype, panel_max_rows, packed_max_rows


def _cache_key(config: PretrainedConfig, panels_available: bool) -> str:
    # The panel kernel's source too: a changed kernel times differently (the AVX2 one
    # went from losing to oneDNN at 12 rows to winning at 16 in one revision).
    panel_kernel = (
        hashlib.sha256((ops.CSRC / "cpu" / "bf16_linear.cpp").read_bytes()).hexdigest() if panels_available else None
    )
    facts = [ops.cpu_signature(), torch.__version__, torch.get_num_threads(), linear_shapes(config),
             config.num_hidden_layers, panel_kernel, _CANDIDATES]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def choose(config: PretrainedConfig, cache_dir: Path | None) -> GemmChoice:
    """The measured choice for this CPU and model, from `cache_dir` when it was made before."""
    panels_available = ops.bf16_linear_available()
    path = None if cache_dir is None else cache_dir / "gemm-probe" / f"{_cache_key(config, panels_available)}.json"
    if path is not None and path.is_file():
        try:
            return GemmChoice(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            log.warning("ignoring unreadable GEMM probe cache %s", path)
    choice = measure(config, panels_available)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(choice), indent=1))
        tmp.replace(path)
    return choice


def main() -> None:
    from engine.model.loader import load_config
    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, Path("~/.cache/coserve").expanduser())
    choice = measure(load_config(model_dir), ops.bf16_linear_available())
    print(f"{name}, {torch.get_num_threads()} threads: dtype {choice.dtype}, panels up to {choice.panel_max_rows} "
          f"rows, packed for oneDNN up to {choice.packed_max_rows} rows, prefills packed to "
          f"{choice.prefill_pack_rows} rows")
    for candidate, by_rows in choice.timings_ms.items():
        print(f"  {candidate:>8}: " + "  ".join(f"{rows}: {ms:.1f}" for rows, ms in by_rows.items()))


if __name__ == "__main__":
    main()
