"""Drive scheduler + runner over sequences with random teacher-forced continuations.

Returns every logits row the engine computed, with the sequence and position it
belongs to, so a test can compare each against a reference model run on the whole
final token sequence.
"""

from __future__ import annotations

import torch

from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def run_teacher_forced(
    scheduler: Scheduler, runner: ModelRunner, gen: torch.Generator
) -> tuple[list[tuple[Sequence, int, torch.Tensor]], bool]:
    """(computed rows as (seq, position, logits [vocab]), whether an iteration mixed decodes and prefills)."""
    model = runner.model
    vocab = model.config.vocab_size
    computed: list[tuple[Sequence, int, torch.Tensor]] = []
    saw_mixed_iteration = False
    while scheduler.has_work():
        plan = scheduler.schedule()
        logits = model.compute_logits(runner.forward(plan))  # [num_tokens, vocab]
        saw_mixed_iteration |= {c.num_new_tokens == 1 for c in plan.chunks} == {True, False}
        row = 0
        sampled = {}
        for chunk in plan.chunks:
            for p in range(chunk.start, chunk.end):
                computed.append((chunk.seq, p, logits[row + p - chunk.start]))
            row += chunk.num_new_tokens
            if chunk.completes_sequence:
                # Random continuation: decodes see arbitrary tokens.
                sampled[chunk.seq.request_id] = int(torch.randint(3, vocab, (1,), generator=gen))
        scheduler.update(plan, sampled)
    return computed, saw_mixed_iteration
