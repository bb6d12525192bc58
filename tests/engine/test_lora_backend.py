"""The native LoRA backend against a per-token loop, on both of its paths, with no model."""

from __future__ import annotations

import pytest
import torch

from engine.lora.adapter import LoRAWeights
from engine.lora.backend import NativeLoRABackend, find_runs
from engine.lora.layout import LoRALayout, LoRATarget
from engine.lora.slots import LoRASlots

pytestmark = pytest.mark.unit

LAYOUT = LoRALayout(
    num_layers=2,
    targets=(LoRATarget("qkv_proj", "self_attn", 32, (("q_proj", 32), ("k_proj", 16), ("v_proj", 16))),),
)


def random_adapter(gen: torch.Generator, rank: int, modules: list[str]) -> LoRAWeights:
    target = LAYOUT.targets[0]
    sizes = dict(target.parts)
    weights = {
        (layer, m): (torch.randn(rank, target.in_features, generator=gen), torch.randn(sizes[m], rank, generator=gen))
        for layer in range(LAYOUT.num_layers)
        for m in modules
    }
    return LoRAWeights(path=None, rank=rank, modules=weights)


def test_find_runs_splits_at_base_tokens_and_slot_decreases():
    assert find_runs([-1, 0, 0, 1, -1, 2, 2, 0, 1, -1]) == [(1, 4), (5, 7), (7, 9)]
    assert find_runs([-1, -1]) == []
    assert find_runs([3]) == [(0, 1)]


@pytest.mark.parametrize(
    "token_slots, grid_runs",
    [
        ([0, 0, 1, 1, 2, 2, 3, 3], 1),  # decodes filling the grid exactly
        ([-1, 0, 0, 0, 1, 3, 3, -1, 2], 2),  # uneven groups, a slot gap, base tokens between
        ([-1, 1] + [0] * 2 + [1] * 12 + [3] * 2, 1),  # a slot decrease: two runs, the second too uneven for a grid
    ],
    ids=["grid-exact", "grid-scattered", "grouped"],
)
def test_native_backend_matches_per_token_loop(token_slots, grid_runs):
    gen = torch.Generator().manual_seed(0)
    slots = LoRASlots(LAYOUT, num_slots=4, max_rank=8, dtype=torch.float32, device="cpu")
    adapters = [
        random_adapter(gen, 8, ["q_proj", "k_proj", "v_proj"]),
        random_adapter(gen, 4, ["q_proj", "v_proj"]),
        random_adapter(gen, 2, ["k_proj"]),
        random_adapter(gen, 8, ["v_proj"]),
    ]
    for slot, adapter in enumerate(adapters):
        slots.write(slot, adapter)
    backend = NativeLoRABackend(slots)
    batch = backend.make_batch(token_slots, "cpu")
    assert sum(run.group_ends is None for run in batch.runs) == grid_runs

    x = torch.randn(len(token_slots), 32, generator=gen)
    base = torch.randn(len(token_slots), 64, generator=gen)
    for layer in range(LAYOUT.num_layers):
        out = base.clone()
        backend.apply(out, x, layer, "qkv_proj", batch)
        expected = base.clone()
        for row, slot in enumerate(token_slots):
            if slot < 0:
                continue
            column = 0
            for module, size in LAYOUT.targets[0].parts:
                pair = adapters[slot].modules.get((layer, module))
                if pair is not None:
                    a, b = pair
                    expected[row, column : column + size] += (x[row] @ a.T) @ b.T
                column += size
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
