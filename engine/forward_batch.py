"""`ForwardBatch`: one iteration's forward pass as plain data.

An `IterationPlan` refers to live `Sequence` objects; the forward needs only numbers
from them: which tokens at which positions, where their KV goes, which blocks each
chunk attends, which adapter each token takes, which rows need logits. Taking those
out once, on the scheduling side, gives the runner an input it can run without the
scheduler's objects, and one that pickles: under tensor parallelism rank 0 builds it
and every other rank receives it (engine/parallel/workers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockCopy
from engine.plan import IterationPlan


@dataclass(frozen=True)
class ChunkSpan:
    """`num_tokens` tokens of one sequence after `start` already computed ones."""

    num_tokens: int
    start: int
    block_table: list[int]  # the sequence's blocks covering [0, start + num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class ForwardBatch:
    # Flat over every scheduled token, in plan order: decodes, prefill chunks, then
    # finetuning chunks. Each [num_tokens].
    input_ids: list[int]
    positions: list[int]
    cache_slots: list[int]  # KV cache slot of each token
    lora_slots: list[int]  # adapter slot of each token, -1 for the base model
    chunks: list[ChunkSpan]  # decodes (one token each) first, then the rest
    num_finetune_tokens: int  # the trailing tokens that belong to finetuning chunks
    # Rows that go through the LM head, in one call: each sampled chunk's last token,
    # then the positions whose prompt logprobs are returned.
    logits_rows: list[int]
    # (job id, sequence id) of each finetuning chunk, in order: whose layer inputs the
    # forward captures (every rank keeps its own, engine/finetune/job_shard.py).
    finetune_owners: list[tuple[str, str]]
    # KV copied between blocks before the forward, in order (engine/block_manager.py).
    kv_copies: list[BlockCopy]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def captured_by_sequence(self, per_layer: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """The forward's captured layer inputs ([num_finetune_tokens, hidden] per layer)
        split by finetuning chunk: sequence id -> [chunk_tokens, hidden] per layer."""
        out, offset = {}, 0
        for (_, seq_id), chunk in zip(self.finetune_owners, self.chunks[len(self.chunks) - len(self.finetune_owners):]):
            out[seq_id] = [t[offset : offset + chunk.num_tokens] for t in per_layer]
            offset += chunk.num_tokens
        return out

    @property
    def num_decodes(self) -> int:
        count = 0
        while count < len(self.chunks) and self.chunks[count].num_tokens == 1:
            count += 1
        return count


def forward_batch(plan: IterationPlan, block_size: int, logits_rows: list[int]) -> ForwardBatch:
    """The plan's forward as plain data (positions frozen when the plan was made)."""
    input_ids: list[int] = []
    positions: list[int] = []
    cache_slots: list[int] = []
    lora_slots: list[int] = []
    chunks: list[ChunkSpan] = []
    for chunk in plan.chunks + plan.finetune_chunks:
        seq, start, end = chunk.seq, chunk.start, chunk.end
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        table = seq.block_table[: -(-end // block_size)]
        cache_slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        lora_slots.extend([seq.lora_slot] * chunk.num_new_tokens)
        chunks.append(ChunkSpan(chunk.num_new_tokens, start, table))
    owners = [(chunk.seq.job.job_id, chunk.seq.request_id) for chunk in plan.finetune_chunks]
    return ForwardBatch(input_ids, positions, cache_slots, lora_slots, chunks, plan.num_finetune_tokens, logits_rows,
                        owners, list(plan.kv_copies))
