"""`IterationPlan`: everything the runner needs for one engine iteration, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence


@dataclass
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at `seq.num_computed_tokens`."""

    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def end(self) -> int:
        return self.seq.num_computed_tokens + self.num_new_tokens

    @property
    def completes_sequence(self) -> bool:
        """This chunk reaches the last known token, so a new token is sampled after it."""
        return self.end == self.seq.num_tokens


@dataclass
class IterationPlan:
    # Decodes (one token each) first, then prefill chunks: the runner batches the
    # leading single-token chunks together and attends the rest one by one.
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
