"""The CPU GEMM probe: its decision rule on recorded timings, and a real measurement."""

from __future__ import annotations

import json

import pytest
import torch

from engine.model import gemm_probe
from engine.model.gemm_probe import DTYPE_ROWS, PACKED_ROWS, PANEL_ROWS, PREFILL_ROWS, GemmChoice, pick
from tests.engine.tiny_models import tiny_llama_config

pytestmark = pytest.mark.tiny


def _timings(float32, bfloat16, panels, bfloat16_packed=None, prefill=lambda r: 1.0 * r,
             float32_packed=None) -> dict[str, dict[str, float]]:
    """ms per row count from functions of the row count; panels keyed as measure() keys them."""
    rows = sorted(set(DTYPE_ROWS) | set(PANEL_ROWS) | set(PACKED_ROWS))
    return {
        "float32": {str(r): float32(r) for r in rows},
        "bfloat16": {str(r): bfloat16(r) for r in rows},
        "float32-onednn": {} if float32_packed is None else {str(r): float32_packed(r) for r in rows},
        "bfloat16-onednn": {} if bfloat16_packed is None else {str(r): bfloat16_packed(r) for r in rows},
        "panels": {f"{dtype}/{r}": panels(r) for dtype in ("float32", "bfloat16") for r in PANEL_ROWS},
        "prefill": {str(r): prefill(r) for r in PREFILL_ROWS},
    }


def test_prefills_pack_to_the_smallest_chunk_at_full_rate():
    def pack_rows(ms_by_rows):
        return pick(_timings(lambda r: 20 + r, lambda r: 3 * (20 + r), lambda r: 50.0,
                             prefill=lambda r: ms_by_rows[r])).prefill_pack_rows

    # The AMD EPYC with AVX2 only (the module docstring): 1.70/1.51/1.34 ms per row.
    assert pack_rows({128: 217.3, 256: 385.8, 512: 684.3}) == 512
    # A GEMM already at full rate at 128 rows, and one still gaining at 512.
    assert pack_rows({128: 100.0, 256: 196.0, 512: 390.0}) == 128
    assert pack_rows({128: 300.0, 256: 400.0, 512: 500.0}) == 512
    # Slower per row at 512 than at 256 (cache effects): measured against the best.
    assert pack_rows({128: 160.0, 256: 256.0, 512: 600.0}) == 256


def test_amx_like_timings_pick_bfloat16_with_panels_for_small_calls():
    # Shaped like the Xeon with AMX of the module docstring: bf16 GEMMs flat and fast,
    # panels ahead while 11 + 1.1 r < 23 + 0.2 r, i.e. up to 13 rows.
    choice = pick(_timings(lambda r: 20 + 1.1 * r, lambda r: 23 + 0.2 * r, lambda r: 11 + 1.1 * r))
    assert (choice.dtype, choice.panel_max_rows) == ("bfloat16", 12)


def test_amd_like_timings_pick_bfloat16_with_panels_up_to_16_rows():
    # Shaped like the 2-core AMD EPYC with AVX512-BF16 but no AMX that issue 13 measured:
    # bf16 GEMMs slower than float32 below ~16 rows, ~2.5x faster from 32 up; the panel
    # kernel, bound by the bytes it streams, ahead of both at small calls.
    choice = pick(_timings(lambda r: 15 + 1.2 * r, lambda r: 25 + 0.35 * r, lambda r: 10 + 1.0 * r))
    assert (choice.dtype, choice.panel_max_rows) == ("bfloat16", 16)


def test_timings_without_fast_bf16_keep_float32():
    # A CPU without bf16 arithmetic: bf16 GEMMs emulated, 3x slower than float32.
    choice = pick(_timings(lambda r: 20 + r, lambda r: 3 * (20 + r), lambda r: 12 + 2 * r))
    assert choice.dtype == "float32" and choice.panel_max_rows == 4  # 12 + 2r < 20 + r up to r < 8


def test_packed_bfloat16_weights_where_they_beat_the_plain_call():
    # As measured on the Xeon with AMX (gemm_probe's docstring): packed ~12 + 0.1 r against
    # plain ~18 + 0.14 r, both ahead of float32; the panels (10 + 1.0 r) beat the packed
    # GEMM below 2.2 rows, so they take up to 2 rows and the packed weights every call above.
    choice = pick(_timings(lambda r: 15 + 0.8 * r, lambda r: 18 + 0.14 * r, lambda r: 10 + 1.0 * r,
                           bfloat16_packed=lambda r: 12 + 0.1 * r))
    assert (choice.dtype, choice.panel_max_rows, choice.packed_max_rows) == ("bfloat16", 2, 256)
    # Packed weights that lose from 32 rows up serve the calls below that only.
    choice = pick(_timings(lambda r: 40.0, lambda r: 20.0, lambda r: 50.0, bfloat16_packed=lambda r: 10 + r / 2))
    assert (choice.dtype, choice.panel_max_rows, choice.packed_max_rows) == ("bfloat16", 0, 16)


def test_float32_choice_packs_no_bfloat16_weights():
    choice = pick(_timings(lambda r: 20 + r, lambda r: 3 * (20 + r), lambda r: 50.0, bfloat16_packed=lambda r: 40 + r))
    assert (choice.dtype, choice.packed_max_rows) == ("float32", 0)


def test_packed_float32_weights_where_they_beat_mkl():
    # The AMD EPYC with AVX2 only (packed_linear's docstring): 30 layers' linears and LM
    # head without oneDNN (MKL-packed or plain, as the engine runs them) against
    # oneDNN-packed, in ms, measured at 1/8/32/128/256 rows, the rows between interpolated;
    # bfloat16 emulated there.
    mkl = {1: 34.1, 2: 36.0, 4: 45.0, 8: 73.0, 12: 85.0, 16: 95.0, 32: 114.5, 64: 170.0, 128: 285.1, 256: 554.1}
    onednn = {1: 26.9, 2: 29.0, 4: 35.0, 8: 45.5, 12: 55.0, 16: 60.0, 32: 78.6, 64: 140.0, 128: 252.3, 256: 486.0}
    choice = pick(_timings(lambda r: mkl[r], lambda r: 5.6 * mkl[r], lambda r: 500.0, float32_packed=lambda r: onednn[r]))
    assert (choice.dtype, choice.panel_max_rows, choice.packed_max_rows) == ("float32", 0, 256)
    # With them float32 wins where bfloat16 would have without them.
    choice = pick(_timings(lambda r: 2 * mkl[r], lambda r: 1.5 * mkl[r], lambda r: 500.0,
                           float32_packed=lambda r: onednn[r]))
    assert (choice.dtype, choice.packed_max_rows) == ("float32", 256)


def test_avx2_panels_winning_everywhere_keep_float32():
    # Shaped like the AMD EPYC with AVX2 only, with the AVX2 panel kernel, in a run where
    # the panels beat oneDNN-packed float32 at every row count they take, for either type
    # (they differ by casts only, here not at all); the type is decided on the GEMMs,
    # where emulated bfloat16 is 5.6x float32.
    mkl = {1: 34.1, 2: 36.0, 4: 45.0, 8: 73.0, 12: 85.0, 16: 95.0, 32: 114.5, 64: 170.0, 128: 285.1, 256: 554.1}
    onednn = {1: 16.1, 2: 17.8, 4: 20.4, 8: 24.9, 12: 31.3, 16: 34.7, 32: 77.0, 64: 130.0, 128: 234.0, 256: 368.7}
    panels = {1: 7.8, 2: 7.4, 4: 9.3, 8: 14.0, 12: 16.1, 16: 20.6, 32: 53.0, 64: 100.0, 128: 193.0}
    timings = _timings(lambda r: mkl[r], lambda r: 5.6 * mkl[r], lambda r: panels[r],
                       float32_packed=lambda r: onednn[r])
    # Casts that happen to time 5% faster for bfloat16 do not make it the type.
    for r in PANEL_ROWS:
        timings["panels"][f"bfloat16/{r}"] *= 0.95
    choice = pick(timings)
    assert (choice.dtype, choice.panel_max_rows, choice.packed_max_rows) == ("float32", 128, 256)


def test_side_by_side_timing_alternates_and_takes_the_median_ratio(monkeypatch):
    # A fake clock that each call advances: a takes 2, 2, 9, 2, 2 ms over the rounds (one
    # slow moment), b takes 4 ms. The calls alternate after a warm-up call of each, and
    # the median ratio (0.5) is not moved by the slow moment.
    clock, calls = [0.0], []
    a_times = iter([1.0, 2.0, 2.0, 9.0, 2.0, 2.0])  # warm-up first

    def step(name, ms):
        def call():
            calls.append(name)
            clock[0] += (ms() if callable(ms) else ms) / 1000
        return call

    monkeypatch.setattr(gemm_probe.time, "perf_counter", lambda: clock[0])
    best_a, best_b, ratio = gemm_probe.side_by_side_ms(step("a", lambda: next(a_times)), step("b", 4.0), rounds=5)
    assert calls == ["a", "b"] + ["a", "b"] * 5
    assert (best_a, best_b, ratio) == pytest.approx((2.0, 4.0, 0.5))


def test_panels_stop_at_their_first_loss():
    # Panels win at 1 and 4 rows but lose at 2: only 1 row is trusted to them.
    panels = {1: 5.0, 2: 50.0, 4: 5.0, 8: 5.0, 12: 5.0, 16: 5.0, 32: 5.0, 64: 5.0, 128: 5.0}
    choice = pick(_timings(lambda r: 30.0, lambda r: 10.0 + r / 100, lambda r: panels[r]))
    assert choice.panel_max_rows == 1


def test_missing_panel_timings_mean_no_panels():
    timings = _timings(lambda r: 30.0, lambda r: 10.0, lambda r: 1.0)
    timings["panels"] = {}
    assert pick(timings).panel_max_rows == 0


def test_choose_measures_once_then_reads_its_cache(tmp_path, monkeypatch):
    config = tiny_llama_config()
    first = gemm_probe.choose(config, tmp_path)
    assert first.dtype in ("float32", "bfloat16") and first.panel_max_rows in (0, *PANEL_ROWS)
    assert first.packed_max_rows in (0, *DTYPE_ROWS, *PANEL_ROWS, *PACKED_ROWS)
    assert set(first.timings_ms["float32"]) == {str(r) for r in set(DTYPE_ROWS) | set(PANEL_ROWS) | set(PACKED_ROWS)}
    [cached] = (tmp_path / "gemm-probe").glob("*.json")
    assert GemmChoice(**json.loads(cached.read_text())) == first

    def fail(*args):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(gemm_probe, "measure", fail)
    assert gemm_probe.choose(config, tmp_path) == first
    # Another thread count is another machine as far as GEMM speed goes: measured anew.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    with pytest.raises(AssertionError, match="measured again"):
        gemm_probe.choose(config, tmp_path)
