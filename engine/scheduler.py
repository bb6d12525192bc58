"""Continuous batching with chunked prefill over a paged KV cache.

Each `schedule()` fills one token budget (`max_num_batched_tokens`, at most
`max_num_seqs` sequences) in priority order:
  1. running sequences with one token left (decodes), oldest first;
  2. running sequences with more left (prefill chunks, or a recompute);
  3. waiting sequences, strictly first come first served.

Priority is arrival order. When the cache runs out of blocks the newest running
sequence is preempted: its blocks are freed and it goes back to the waiting queue
to be recomputed later. Because admission never skips the head of the queue and
victims are always the newest, the oldest request always makes progress: nothing
starves and nothing is dropped.

Prefill is packed in whole prompts. The oldest prefill takes what is left of the
budget; the prefills after it join only up to `prefill_pack_tokens` prefill tokens in
all. A CPU's GEMMs reach their full rate at a few hundred rows (the engine measures
where: engine/model/gemm_probe.py), so a larger iteration prefills hardly faster per
token: it only makes every prompt in it wait for the last one, and every running
decode wait for all of them. Packed, a burst of short prompts gets its first tokens
one iteration after another instead of all at the end of one long iteration (eight
128-token prompts after a cached 1,024-token prefix, 2-core AMD EPYC, 2026-12-07:
first tokens at 1.2 s for four and 2.4-2.8 s for the others packed to 512, against
3.3-3.5 s for all eight in one iteration). A long prompt still goes through in one
chunk of up to the whole budget: split finer, a prompt of 1,152 tokens took three
passes beside the decodes and its TTFT at 2 req/s tripled (bench/results/history.md).

With prefix caching, a sequence admitted from the queue first takes the cached blocks
of its longest cached prefix (engine/block_manager.py), and the plan copies the KV of
the tokens it shares with a cached block beyond them; its first chunk starts after
those. Every chunk's newly full blocks are registered after the iteration. A request
that returns prompt logprobs computes its whole prompt.

Training sequences of finetuning jobs come last: their forward chunks take at most
the `finetune_budget` tokens the caller allows this iteration (what inference leaves
within the latency SLO), they never preempt inference, and they are the first to go
when inference needs KV blocks (their forward restarts later).

A sequence with a LoRA adapter also needs one of the `max_loras` compute slots while
it runs (`AdapterSlots`). When the head of the queue cannot get one, admission stops
there, as it does for KV blocks: the running sequences finish, their slots free up,
and the head goes next, so a request for a cold adapter waits but never starves.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from engine.block_manager import BlockManager, CachedPrefix
from engine.plan import IterationPlan, ScheduledChunk
from engine.sequence import Sequence, SequenceStatus


class AdapterSlots(Protocol):
    """Compute slots for LoRA adapters (engine/lora/manager.py)."""

    def activate(self, entry) -> bool: ...

    def deactivate(self, entry) -> None: ...


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        adapter_slots: AdapterSlots | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefill_pack_tokens: int | None = None,
    ):
        """clock: seconds, for KV pins' expiry. prefill_pack_tokens: see the module
        docstring; None = the whole budget."""
        self.block_manager = block_manager
        self.prefill_pack_tokens = prefill_pack_tokens or max_num_batched_tokens
        self.clock = clock
        self.adapter_slots = adapter_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by priority
        self.running: list[Sequence] = []  # sorted by priority
        self.num_preemptions = 0
        self._arrivals = itertools.count()
        self._priority: dict[str, int] = {}
        self.finetuning: list[Sequence] = []  # training sequences in their forward, round robin
        self._finetune_turn = 0

    # -- queue management -------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(f"prompt of {seq.num_tokens} tokens leaves no room under max_model_len={self.max_model_len}")
        self._priority[seq.request_id] = next(self._arrivals)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_finetune(self, seq: Sequence) -> None:
        """A training sequence whose forward should run in the coming iterations."""
        self.finetuning.append(seq)

    def drop_finetune(self, seq: Sequence) -> None:
        """Forget a training sequence (its job was cancelled), releasing what it holds."""
        if seq in self.finetuning:
            self._stop_forward(seq)
            self.finetuning.remove(seq)

    def _key(self, seq: Sequence) -> int:
        return self._priority[seq.request_id]

    # -- planning ---------------------------------------------------------

    def decoding(self) -> list[Sequence]:
        """Running sequences with one token left to compute: the next plan decodes for them."""
        return [s for s in self.running if s.num_uncomputed_tokens == 1]

    def schedule(self, finetune_budget: Callable[[IterationPlan, int], int] | None = None) -> IterationPlan:
        """finetune_budget(plan with its inference chunks, tokens left) -> finetuning tokens
        this iteration may add (the engine asks its latency model); None = no finetuning."""
        plan = IterationPlan()
        self.block_manager.expire_pins(self.clock())
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledChunk] = {}

        decodes = self.decoding()
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if seq.num_uncomputed_tokens > 1:
                num_new = self._packed(num_new, scheduled, plan)
                if num_new == 0:
                    break  # prefills come last in this loop
            if not self._make_room(seq, num_new, plan, scheduled):
                continue  # preempted itself
            scheduled[seq.request_id] = ScheduledChunk(seq, num_new)
            # Recounted rather than decremented: a preemption may have dropped a chunk.
            budget = self.max_num_batched_tokens - sum(c.num_new_tokens for c in scheduled.values())

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]  # holds no blocks: new, or preempted
            # Its prompt logprobs are computed, not read from the cache.
            prefix = CachedPrefix() if seq.wants_prompt_logprobs() else self.block_manager.cached_prefix(seq)
            cached_tokens = prefix.num_tokens(self.block_manager.block_size)
            num_new = self._packed(min(seq.num_tokens - cached_tokens, budget), scheduled, plan)
            if num_new == 0:
                break
            if not self.block_manager.can_allocate(seq, cached_tokens + num_new, prefix):
                break
            if seq.lora is not None and not self.adapter_slots.activate(seq.lora):
                break
            self.waiting.pop(0)
            copy = self.block_manager.allocate(seq, cached_tokens + num_new, prefix)
            if copy is not None:
                plan.kv_copies.append(copy)
            seq.num_computed_tokens = cached_tokens
            if seq.num_cached_tokens is None:  # first admission: what the request is told
                seq.num_cached_tokens = cached_tokens
                self.block_manager.record_lookup(seq.num_prompt_tokens, cached_tokens)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self._key)
            scheduled[seq.request_id] = ScheduledChunk(seq, num_new)
            budget -= num_new

        # Decodes, then prefill chunks; within each, grouped by adapter slot (base model
        # first) so the LoRA backend sees few contiguous runs; priority order otherwise.
        chunks = sorted(scheduled.values(), key=lambda c: (c.num_new_tokens > 1, c.seq.lora_slot, self._key(c.seq)))
        plan.chunks = chunks
        if finetune_budget is not None and self.finetuning:
            self._schedule_finetune(plan, min(budget, finetune_budget(plan, budget)))
        return plan

    def _packed(self, num_new: int, scheduled: dict[str, ScheduledChunk], plan: IterationPlan) -> int:
        """Of the `num_new` tokens a prefill chunk could take, those packing lets it take
        beside the chunks `scheduled`: all for the first prefill, what is left of
        `prefill_pack_tokens` for the others. Notes on the plan when it held some back."""
        prefilling = sum(c.num_new_tokens for c in scheduled.values() if c.seq.num_uncomputed_tokens > 1)
        if prefilling == 0:
            return num_new
        room = max(0, self.prefill_pack_tokens - prefilling)
        if room < num_new:
            plan.prefill_held_back = True
        return min(num_new, room)

    def _schedule_finetune(self, plan: IterationPlan, budget: int) -> None:
        """Forward chunks of training sequences, jobs taking turns, within `budget` tokens."""
        if not self.finetuning:
            return
        for seq in self._finetune_order():
            if budget == 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, seq.num_computed_tokens + num_new):
                continue
            if seq.status is not SequenceStatus.RUNNING:
                if not self.adapter_slots.activate(seq.lora):
                    continue
                seq.status = SequenceStatus.RUNNING
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
            plan.finetune_chunks.append(ScheduledChunk(seq, num_new))
            budget -= num_new

    def _finetune_order(self) -> list[Sequence]:
        """Jobs (told apart by their adapter) take turns going first; within a job, the
        sequence that started first goes first, so that its backward can begin soonest."""
        jobs: dict[int, list[Sequence]] = {}
        for seq in self.finetuning:  # in the order they were added
            jobs.setdefault(id(seq.lora), []).append(seq)
        turns = list(jobs.values())
        start = self._finetune_turn % len(turns)
        self._finetune_turn += 1
        return [seq for job in turns[start:] + turns[:start] for seq in job]

    def _make_room(
        self, seq: Sequence, num_new: int, plan: IterationPlan, scheduled: dict[str, ScheduledChunk]
    ) -> bool:
        """Allocate blocks for `seq`'s chunk, preempting newer sequences if needed.

        Returns False when `seq` itself had to be preempted.
        """
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.can_allocate(seq, target):
            trainee = next((s for s in self.finetuning if s.block_table), None)
            if trainee is not None:
                self._stop_forward(trainee)
                trainee.restart_forward()
                continue
            victim = self.running[-1]
            scheduled.pop(victim.request_id, None)
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, target)
        return True

    def _preempt(self, seq: Sequence, plan: IterationPlan) -> None:
        self.running.remove(seq)
        self._release_slot(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=self._key)
        plan.preempted.append(seq)

    # -- after the iteration ----------------------------------------------

    def _stop_forward(self, seq: Sequence) -> None:
        """Release a training sequence's blocks and slot (forward done, or preempted)."""
        self.block_manager.free(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.adapter_slots.deactivate(seq.lora)
            seq.status = SequenceStatus.WAITING

    def update_finetune(self, plan: IterationPlan) -> list[Sequence]:
        """Advance training forwards; returns those whose forward just completed."""
        completed = []
        for chunk in plan.finetune_chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                self._stop_forward(seq)
                self.finetuning.remove(seq)
                completed.append(seq)
        return completed

    def update(self, plan: IterationPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Advance token counts, append sampled tokens, finish what stops. Returns the finished."""
        finished = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            self.block_manager.register_computed(seq)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            seq.token_ids.append(token)
            if seq.grammar is not None:
                # The mask let through only tokens the matcher accepts.
                seq.grammar.accept_token(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            seq.stop_token_id = token
            return "stop"
        # A complete grammar allows only EOS, and its matcher terminates on it: the
        # output is done even where ignore_eos would go on.
        if seq.grammar is not None and seq.grammar.is_terminated():
            seq.stop_token_id = token
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora is not None and seq.status is SequenceStatus.RUNNING:
            self.adapter_slots.deactivate(seq.lora)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release_slot(seq)
        # Pinned however it ended: a stop string or a client that left also ends in an abort.
        if seq.kv_ttl_s:
            self.block_manager.pin(seq, until=self.clock() + seq.kv_ttl_s)
        else:
            self.block_manager.free(seq, finished=True)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._priority.pop(seq.request_id, None)
