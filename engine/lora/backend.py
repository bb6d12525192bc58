"""LoRA backends: how a batch of tokens, each with its own adapter, gets its LoRA deltas.

For a projection y = x W^T whose parts p have adapters (A_p, B_p) in slot s, a token
of slot s gets y[:, part p] += (x A_p^T) B_p^T. The scheduler orders a plan's chunks
by slot (within decodes and within prefills), so the adapter tokens of a batch form
a few contiguous runs of rows, each sorted by slot (`LoRABatch`). Every projection
of every layer then runs, per run of m rows:

    shrink:  [m, in]   x A^T   -> [m, parts * R]   one grouped GEMM, group = slot
    expand:  [m, R]    x B_p^T -> [m, out_p]       one grouped GEMM per part, added in place

on views of the batch, with no gather or scatter; base-model rows are untouched.
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
class LoRARun:
    """Rows [start, end) of the flat batch, sorted by adapter slot."""

    start: int
    end: int
    group_ends: torch.Tensor | None  # [num_slots] int32 ends of each slot's rows (grouped GEMM form)
    # Grid form, for runs of small groups (decodes): slots [lo, lo + groups), each
    # given `width` rows; `dest[i]` is row i's place in that [groups * width] grid,
    # None when the run fills the grid exactly.
    lo: int = 0
    groups: int = 0
    width: int = 0
    dest: torch.Tensor | None = None


@dataclass(frozen=True)
class LoRABatch:
    runs: list[LoRARun]


def find_runs(token_slots: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) ranges of adapter tokens (slot >= 0) whose slots never decrease."""
    runs = []
    start = None
    for row, slot in enumerate(token_slots):
        if start is not None and (slot < 0 or slot < token_slots[row - 1]):
            runs.append((start, row))
            start = None
        if start is None and slot >= 0:
            start = row
    if start is not None:
        runs.append((start, len(token_slots)))
    return runs


class LoRABackend(Protocol):
    """The contract a LoRA backend keeps; the runner and the model see nothing else."""

    def make_batch(self, token_slots: list[int], device: str) -> LoRABatch | None: ...

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str, batch: LoRABatch) -> None: ...


# Runs whose groups padded to equal size hold at most this many times their rows use
# one batched GEMM (`torch.bmm`, a single call); others the grouped GEMM, whose CPU
# version loops over groups. Measured 2026-11-21 (2 cores): 8 groups of 4 rows x
# [576, 48] took 10 us as bmm, 38 us as grouped_mm.
_MAX_PADDING = 2


class NativeLoRABackend:
    def __init__(self, slots: LoRASlots):
        self.slots = slots

    def make_batch(self, token_slots: list[int], device: str) -> LoRABatch | None:
        """token_slots: the slot of each flat-batch token, -1 for the base model. None if no token has one."""
        runs = []
        for start, end in find_runs(token_slots):
            run_slots = token_slots[start:end]
            counts = [0] * self.slots.num_slots
            for slot in run_slots:
                counts[slot] += 1
            lo, hi = run_slots[0], run_slots[-1]
            width = max(counts)
            groups = hi - lo + 1
            if groups * width <= _MAX_PADDING * (end - start):
                dest = None
                if groups * width != end - start:
                    first = [0] * self.slots.num_slots
                    places = []
                    for slot in run_slots:
                        places.append((slot - lo) * width + first[slot])
                        first[slot] += 1
                    dest = torch.tensor(places, dtype=torch.long, device=device)
                runs.append(LoRARun(start, end, None, lo, groups, width, dest))
            else:
                ends = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                runs.append(LoRARun(start, end, ends.to(device)))
        return LoRABatch(runs) if runs else None

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str, batch: LoRABatch) -> None:
        """out: [num_tokens, out_features] from the base projection, updated in place; x: [num_tokens, in]."""
        R = self.slots.rank
        a = self.slots.a[layer][target]  # [num_slots, in, parts * R]
        bs = self.slots.b[layer][target]  # per part [num_slots, R, out_p]
        for run in batch.runs:
            if run.group_ends is None:
                self._apply_padded(out, x, a, bs, run)
                continue
            shrunk = F.grouped_mm(x[run.start : run.end], a, offs=run.group_ends)  # [m, parts * R]
            column = 0
            for part, b in enumerate(bs):
                delta = F.grouped_mm(shrunk[:, part * R : (part + 1) * R], b, offs=run.group_ends)  # [m, out_p]
                out[run.start : run.end, column : column + b.shape[2]] += delta
                column += b.shape[2]

    def _apply_padded(self, out, x, a, bs, run: LoRARun) -> None:
        """Small groups as one batched GEMM: rows laid out on a [groups, width] grid."""
        R = self.slots.rank
        rows = x[run.start : run.end]  # [m, in]
        if run.dest is None:
            grid = rows.view(run.groups, run.width, -1)
        else:
            # Gap rows stay uninitialised: each grid row only ever feeds its own output
            # row, and gap outputs are never read back.
            grid = rows.new_empty(run.groups * run.width, rows.shape[1])
            grid.index_copy_(0, run.dest, rows)
            grid = grid.view(run.groups, run.width, -1)  # [groups, width, in]
        slots = slice(run.lo, run.lo + run.groups)
        shrunk = torch.bmm(grid, a[slots])  # [groups, width, parts * R]
        column = 0
        for part, b in enumerate(bs):
            out_p = b.shape[2]
            delta = torch.bmm(shrunk[:, :, part * R : (part + 1) * R], b[slots]).view(-1, out_p)
            if run.dest is not None:
                delta = delta.index_select(0, run.dest)  # [m, out_p]
            out[run.start : run.end, column : column + out_p] += delta
            column += out_p


@dataclass(frozen=True)
class LoRAContext:
    """What the model needs during one forward: the backend and this batch's grouping."""

    backend: LoRABackend
    batch: LoRABatch

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        """out plus this batch's deltas, added in place (engine/model/llama.py LayerLoRA)."""
        self.backend.apply(out, x, layer, target, self.batch)
        return out
