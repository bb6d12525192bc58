"""Compute-resident adapters: `max_loras` slots stacked per projection.

Per layer and target, for slot s:
  a[s]:       [in_features, num_parts * R]   A^T of every part, part p in columns [p R, p R + r)
  b[p][s]:    [R, out_features_p]            scaled B^T of part p, rows [0, r)
with R = max_lora_rank rounded up to a multiple of 8 (grouped GEMMs want 16-byte
aligned strides) and zeros wherever an adapter has a lower rank or skips a part:
zero columns of A and zero rows of B add nothing, so every slot has one shape and
a batch of adapters is one grouped matmul per part. The tensors are allocated with
the first adapter written: a base-only server pays nothing.
"""

from __future__ import annotations

import torch

from engine.lora.adapter import LoRAWeights
from engine.lora.layout import LoRALayout


def padded_rank(max_rank: int) -> int:
    return -(-max_rank // 8) * 8


class LoRASlots:
    def __init__(self, layout: LoRALayout, num_slots: int, max_rank: int, dtype: torch.dtype, device: str):
        self.layout = layout
        self.num_slots = num_slots
        self.rank = padded_rank(max_rank)
        self.dtype, self.device = dtype, device
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []

    def _allocate(self) -> None:
        R, layout, num_slots, dtype, device = self.rank, self.layout, self.num_slots, self.dtype, self.device
        for _ in range(layout.num_layers):
            self.a.append({
                t.name: torch.zeros(num_slots, t.in_features, len(t.parts) * R, dtype=dtype, device=device)
                for t in layout.targets
            })
            self.b.append({
                t.name: [torch.zeros(num_slots, R, size, dtype=dtype, device=device) for _, size in t.parts]
                for t in layout.targets
            })

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Put `weights` into `slot`, replacing whatever was there."""
        if not self.a:
            self._allocate()
        R = self.rank
        for layer in range(self.layout.num_layers):
            for target in self.layout.targets:
                a = self.a[layer][target.name][slot]  # [in, parts * R]
                a.zero_()
                for part, (module, _) in enumerate(target.parts):
                    b = self.b[layer][target.name][part][slot]  # [R, out_part]
                    b.zero_()
                    pair = weights.modules.get((layer, module))
                    if pair is None:
                        continue
                    lora_a, lora_b = pair  # [r, in], [out_part, r]
                    r = lora_a.shape[0]
                    a[:, part * R : part * R + r].copy_(lora_a.T)
                    b[:r].copy_(lora_b.T)
