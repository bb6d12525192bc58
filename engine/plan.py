"""`IterationPlan`: everything the runner needs for one engine iteration, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_manager import BlockCopy
from engine.finetune.backward_work import BackwardAllowance, BackwardWork
from engine.latency_model import IterationShape, causal_context
from engine.sequence import Sequence


@dataclass
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at `start`.

    Positions are frozen when the chunk is planned: the sequence moves on after
    the iteration, the record of what this iteration computed does not.
    """

    seq: Sequence
    num_new_tokens: int
    start: int = field(init=False)
    # This chunk reaches the last known token, so a new token is sampled after it.
    completes_sequence: bool = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.completes_sequence = self.end == self.seq.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class IterationPlan:
    # Decodes (one token each) first, then prefill chunks: the runner batches the
    # leading single-token chunks together and attends the rest one by one.
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Forward chunks of training sequences, after all inference; never sampled.
    finetune_chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # KV the forward needs copied first: admitted sequences' cached tails (engine/block_manager.py).
    kv_copies: list[BlockCopy] = field(default_factory=list)
    # Prompt tokens were ready but prefill packing kept them for later iterations
    # (engine/scheduler.py): inference is not leaving this iteration idle, so it carries
    # no finetuning (coserving_policy.py).
    prefill_held_back: bool = False
    # The finetuning backward that runs after the forward: set by the co-serving policy
    # from predicted costs before the plan runs (coserving_policy.py).
    backward: BackwardAllowance = field(default_factory=BackwardAllowance)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks) + self.num_finetune_tokens

    @property
    def num_finetune_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.finetune_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.finetune_chunks


def attended_context(chunk: ScheduledChunk) -> int:
    """Context tokens the chunk's queries attend in all: query p sees positions 0..p."""
    return causal_context(chunk.start, chunk.num_new_tokens)


_NO_BACKWARD = BackwardWork()


def iteration_shape(plan: IterationPlan, backward: BackwardWork = _NO_BACKWARD) -> IterationShape:
    """The plan's composition in the latency model's units."""
    decodes = [c for c in plan.chunks if c.num_new_tokens == 1]
    prefills = [c for c in plan.chunks if c.num_new_tokens > 1] + plan.finetune_chunks
    prefill_context = sum(attended_context(c) for c in prefills)
    return IterationShape(
        decode_tokens=len(decodes),
        prefill_tokens=sum(c.num_new_tokens for c in prefills) - plan.num_finetune_tokens,
        context_tokens=sum(c.end for c in decodes) + prefill_context,
        finetune_forward_tokens=plan.num_finetune_tokens,
        finetune_backward_layer_tokens=backward.layer_tokens,
        finetune_loss_tokens=backward.loss_tokens,
        prefill_context_tokens=prefill_context,
    )
