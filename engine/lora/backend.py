"""LoRA backends: how a batch of tokens, each with its own adapter, gets its LoRA deltas.

For a projection y = x W^T whose parts p have adapters (A_p, B_p) in slot s, a token
of slot s gets y[:, part p] += (x A_p^T) B_p^T. Tokens are grouped by slot once per
iteration (`LoRABatch`); every projection of every layer then runs

    shrink:  [m, in]   x A^T   -> [m, parts * R]   one grouped GEMM, group = slot
    expand:  [m, R]    x B_p^T -> [m, out_p]       one grouped GEMM per part

over the m adapter tokens only; base-model tokens in the same batch are untouched.
`NativeLoRABackend` does this with `torch.nn.functional.grouped_mm`, which runs on
CPU (float32/bfloat16) and on CUDA; it is also the reference a kernel backend is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.lora.slots import LoRASlots


@dataclass(frozen=True)
class LoRABatch:
    rows: torch.Tensor  # [m] flat-batch rows of adapter tokens, sorted by slot
    group_ends: torch.Tensor  # [num_slots] int32, end of each slot's run in `rows`


class LoRABackend(Protocol):
    """The contract a LoRA backend keeps; the runner and the model see nothing else."""

    def make_batch(self, token_slots: list[int], device: str) -> LoRABatch | None: ...

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str, batch: LoRABatch) -> None: ...


class NativeLoRABackend:
    def __init__(self, slots: LoRASlots):
        self.slots = slots

    def make_batch(self, token_slots: list[int], device: str) -> LoRABatch | None:
        """token_slots: the slot of each flat-batch token, -1 for the base model. None if no token has one."""
        counts = [0] * self.slots.num_slots
        rows_by_slot: list[list[int]] = [[] for _ in counts]
        for row, slot in enumerate(token_slots):
            if slot >= 0:
                rows_by_slot[slot].append(row)
        rows = [row for group in rows_by_slot for row in group]
        if not rows:
            return None
        ends, total = [], 0
        for group in rows_by_slot:
            total += len(group)
            ends.append(total)
        return LoRABatch(
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            group_ends=torch.tensor(ends, dtype=torch.int32, device=device),
        )

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str, batch: LoRABatch) -> None:
        """out: [num_tokens, out_features] from the base projection, updated in place; x: [num_tokens, in]."""
        R = self.slots.rank
        xs = x.index_select(0, batch.rows)  # [m, in]
        shrunk = F.grouped_mm(xs, self.slots.a[layer][target], offs=batch.group_ends)  # [m, parts * R]
        column = 0
        for part, b in enumerate(self.slots.b[layer][target]):
            delta = F.grouped_mm(shrunk[:, part * R : (part + 1) * R], b, offs=batch.group_ends)  # [m, out_p]
            out[:, column : column + b.shape[2]].index_add_(0, batch.rows, delta)
            column += b.shape[2]


@dataclass(frozen=True)
class LoRAContext:
    """What the model needs during one forward: the backend and this batch's grouping."""

    backend: LoRABackend
    batch: LoRABatch

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> None:
        self.backend.apply(out, x, layer, target, self.batch)
