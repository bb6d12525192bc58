"""Scheduler and block manager, with no model: token counts in, plans out.

A fake "runner" completes each plan by appending a token to every sequence whose
chunk reached its end, exactly what the real runner's sampling does.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from engine.block_manager import BlockManager
from engine.messages import SamplingParams
from engine.plan import IterationPlan
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.unit

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_model_len=1024):
    blocks = BlockManager(num_blocks, block_size)
    return Scheduler(blocks, budget, max_seqs, max_model_len, eos_token_ids=[EOS])


def make_seq(request_id, prompt_len, max_tokens=4, **params):
    return Sequence(request_id, [7] * prompt_len, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params), 0.0)


def step(scheduler: Scheduler, token: int = 5) -> tuple[IterationPlan, list[Sequence]]:
    plan = scheduler.schedule()
    sampled = {c.seq.request_id: token for c in plan.chunks if c.completes_sequence}
    return plan, scheduler.update(plan, sampled)


def run_to_completion(scheduler: Scheduler, limit=10_000) -> list[IterationPlan]:
    plans = []
    for _ in range(limit):
        if not scheduler.has_work():
            return plans
        plan, _ = step(scheduler)
        plans.append(plan)
    raise AssertionError("scheduler did not finish")


def test_token_budget_and_seq_limit_are_respected():
    scheduler = make_scheduler(budget=16, max_seqs=3)
    for i in range(6):
        scheduler.add(make_seq(f"r{i}", prompt_len=11, max_tokens=5))
    for plan in run_to_completion(scheduler):
        assert plan.num_tokens <= 16
        assert len(plan.chunks) <= 3
        assert len({c.seq.request_id for c in plan.chunks}) == len(plan.chunks)


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end():
    scheduler = make_scheduler(budget=8)
    seq = make_seq("long", prompt_len=20, max_tokens=2)
    scheduler.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        plan, _ = step(scheduler)
        chunks.append(plan.chunks[0].num_new_tokens)
        assert plan.chunks[0].completes_sequence == (seq.num_computed_tokens == 20)
    assert chunks == [8, 8, 4]
    plan, finished = step(scheduler)
    assert [c.num_new_tokens for c in plan.chunks] == [1]
    assert finished == [seq] and seq.finish_reason == "length"


def test_decodes_come_first_then_prefill_chunks():
    scheduler = make_scheduler(budget=10)
    scheduler.add(make_seq("a", prompt_len=3, max_tokens=10))
    step(scheduler)  # a is prefilled and now decodes
    scheduler.add(make_seq("b", prompt_len=30, max_tokens=2))
    plan, _ = step(scheduler)
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 1), ("b", 9)]


def test_preemption_under_a_tiny_cache_recomputes_and_finishes_everything():
    # 6 blocks of 4 tokens = 24 slots; four requests of 9 + 8 tokens need 68.
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=32)
    seqs = [make_seq(f"r{i}", prompt_len=9, max_tokens=8) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    preempted = set()
    for plan in run_to_completion(scheduler):
        preempted.update(s.request_id for s in plan.preempted)
        assert scheduler.block_manager.num_free_blocks >= 0
    assert preempted, "the cache is too small for all four: someone must be preempted"
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == 8 for s in seqs)
    assert all(s.finish_reason == "length" for s in seqs)
    assert scheduler.block_manager.num_free_blocks == 6
    # The newest is preempted first: the oldest request never is.
    assert "r0" not in preempted


def test_preempted_sequence_keeps_its_generated_tokens():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=32)
    old, new = make_seq("old", prompt_len=6, max_tokens=8), make_seq("new", prompt_len=6, max_tokens=8)
    scheduler.add(old)
    scheduler.add(new)
    tokens = itertools.count(10)
    while not new.num_preemptions:
        plan = scheduler.schedule()
        scheduler.update(plan, {c.seq.request_id: next(tokens) for c in plan.chunks if c.completes_sequence})
    generated = new.output_token_ids
    assert generated and new.num_computed_tokens == 0
    run_to_completion(scheduler)
    assert new.output_token_ids[: len(generated)] == generated


def test_no_request_starves_under_a_steady_stream():
    scheduler = make_scheduler(num_blocks=12, block_size=4, budget=16, max_seqs=4)
    first = make_seq("first", prompt_len=10, max_tokens=6)
    scheduler.add(first)
    arrivals = itertools.count()
    for _ in range(200):
        if first.is_finished:
            break
        scheduler.add(make_seq(f"later{next(arrivals)}", prompt_len=10, max_tokens=6))
        step(scheduler)
    assert first.is_finished
    # Everyone admitted later also finishes once arrivals stop.
    run_to_completion(scheduler)


def test_waiting_queue_is_first_come_first_served():
    scheduler = make_scheduler(num_blocks=64, budget=64, max_seqs=2)
    for name in ["a", "b", "c", "d"]:
        scheduler.add(make_seq(name, prompt_len=4, max_tokens=3))
    order = []
    for plan in run_to_completion(scheduler):
        for chunk in plan.chunks:
            if chunk.start == 0:
                order.append(chunk.seq.request_id)
    assert order == ["a", "b", "c", "d"]


def test_eos_stops_unless_ignored_and_stop_token_ids_stop():
    scheduler = make_scheduler()
    plain, ignoring, custom = (
        make_seq("plain", 3, max_tokens=5),
        make_seq("ignoring", 3, max_tokens=5, ignore_eos=True),
        make_seq("custom", 3, max_tokens=5, ignore_eos=True, stop_token_ids=(42,)),
    )
    for seq in (plain, ignoring, custom):
        scheduler.add(seq)
    _, finished = step(scheduler, token=EOS)
    assert finished == [plain] and plain.finish_reason == "stop" and plain.stop_token_id == EOS
    _, finished = step(scheduler, token=42)
    assert finished == [custom] and custom.stop_token_id == 42
    run_to_completion(scheduler)
    assert ignoring.finish_reason == "length" and ignoring.num_output_tokens == 5


def test_abort_frees_blocks():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add(make_seq("x", prompt_len=20, max_tokens=50))
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks < 16
    assert scheduler.abort("x").finish_reason == "abort"
    assert scheduler.block_manager.num_free_blocks == 16
    assert not scheduler.has_work()


def test_context_limit_finishes_with_length_and_overlong_prompt_is_refused():
    scheduler = make_scheduler(max_model_len=12)
    seq = make_seq("x", prompt_len=10, max_tokens=100)
    scheduler.add(seq)
    run_to_completion(scheduler)
    assert seq.num_tokens == 12 and seq.finish_reason == "length"
    with pytest.raises(ValueError):
        scheduler.add(make_seq("y", prompt_len=12))


def test_block_manager_ref_counts():
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("x", prompt_len=1)
    assert blocks.blocks_needed(seq, 9) == 3
    blocks.allocate(seq, 9)
    assert len(seq.block_table) == 3 and blocks.num_free_blocks == 1
    assert blocks.can_allocate(seq, 16) and not blocks.can_allocate(seq, 17)
    blocks.free(seq)
    assert blocks.num_free_blocks == 4 and seq.block_table == []


@dataclasses.dataclass(eq=False)
class FakeAdapter:
    name: str
    slot: int | None = None


class CountingSlots:
    """`max_loras` compute slots, bookkept like LoRAManager: an adapter holds a slot while any of its sequences run."""

    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.running: dict[str, int] = {}
        self.peak = 0

    def activate(self, adapter: FakeAdapter) -> bool:
        if adapter.name not in self.running and len(self.running) == self.max_loras:
            return False
        self.running[adapter.name] = self.running.get(adapter.name, 0) + 1
        adapter.slot = sorted(self.running).index(adapter.name)
        self.peak = max(self.peak, len(self.running))
        return True

    def deactivate(self, adapter: FakeAdapter) -> None:
        self.running[adapter.name] -= 1
        if not self.running[adapter.name]:
            del self.running[adapter.name]


def test_cold_adapter_waits_for_a_slot_without_starving():
    """Two slots, a steady stream for adapters a and b: the request for c still runs, in arrival order."""
    slots = CountingSlots(max_loras=2)
    scheduler = Scheduler(BlockManager(64, 4), 32, 8, 1024, eos_token_ids=[EOS], adapter_slots=slots)
    arrivals = itertools.count()
    finished_order = []

    adapters = {name: FakeAdapter(name) for name in "abc"}

    def add(name):
        seq = make_seq(f"{name}{next(arrivals)}", prompt_len=5, max_tokens=3)
        seq.lora = adapters[name]
        scheduler.add(seq)

    add("a"), add("b"), add("c")
    for i in range(60):
        if i < 40:
            add("ab"[i % 2])  # hot adapters keep arriving
        _, done = step(scheduler)
        finished_order += [s.request_id for s in done]
        assert len(slots.running) <= 2
    assert "c2" in finished_order, "the cold adapter's request starved"
    # Nothing that arrived after c finished before it: admission never skipped it.
    later = [r for r in finished_order if int(r[1:]) > 2]
    assert later and finished_order.index("c2") < finished_order.index(later[0])
    run_to_completion(scheduler)
    assert slots.peak == 2 and slots.running == {}


def test_prefills_after_the_oldest_are_packed_up_to_the_pack_size():
    """A burst of short prompts goes through a few per iteration, oldest first; the
    decodes of those already prefilled ride along in every iteration."""
    blocks = BlockManager(256, 4)
    scheduler = Scheduler(blocks, 64, 16, 1024, eos_token_ids=[EOS], prefill_pack_tokens=12)
    for i in range(6):
        scheduler.add(make_seq(f"r{i}", prompt_len=5, max_tokens=8))
    plans = [step(scheduler)[0] for _ in range(3)]
    prefilled = [[c.seq.request_id for c in plan.chunks if c.num_new_tokens > 1] for plan in plans]
    # 5 + 5 fill 10 of 12 packed tokens and the third prompt takes the 2 left; next time
    # it goes first with its 3, and the fifth gets 4 of its 5: its last token rides with
    # the decodes after that.
    assert prefilled == [["r0", "r1", "r2"], ["r2", "r3", "r4"], ["r5"]]
    assert [c.num_new_tokens for c in plans[0].chunks] == [5, 5, 2]
    assert [c.num_new_tokens for c in plans[1].chunks if c.num_new_tokens > 1] == [3, 5, 4]
    one_token = [{c.seq.request_id for c in plan.chunks if c.num_new_tokens == 1} for plan in plans]
    assert one_token == [set(), {"r0", "r1"}, {"r0", "r1", "r2", "r3", "r4"}]
    # The first two left prompt tokens waiting; the third took every one there was.
    assert [plan.prefill_held_back for plan in plans] == [True, True, False]


def test_the_oldest_prefill_takes_the_whole_budget_whatever_the_pack_size():
    """A long prompt is not split finer than the budget: it goes in one chunk beside the
    decodes, and the prompt behind it waits rather than splitting it further."""
    blocks = BlockManager(256, 4)
    scheduler = Scheduler(blocks, 64, 16, 1024, eos_token_ids=[EOS], prefill_pack_tokens=12)
    scheduler.add(make_seq("short", prompt_len=3, max_tokens=8))
    step(scheduler)  # now decoding
    scheduler.add(make_seq("long", prompt_len=50))
    scheduler.add(make_seq("next", prompt_len=30))
    plan, _ = step(scheduler)
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("short", 1), ("long", 50)]
    assert plan.prefill_held_back
    plan, _ = step(scheduler)
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("short", 1), ("long", 1), ("next", 30)]


def test_without_a_pack_size_prefills_fill_the_budget():
    scheduler = make_scheduler(budget=32)
    for i in range(4):
        scheduler.add(make_seq(f"r{i}", prompt_len=10))
    plan, _ = step(scheduler)
    assert [c.num_new_tokens for c in plan.chunks] == [10, 10, 10, 2]
    assert not plan.prefill_held_back  # the budget, not packing, ran out
