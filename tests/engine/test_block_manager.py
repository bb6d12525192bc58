"""Block manager with prefix caching, without a model: hashing, reference counts, LRU,
cached tails, pins."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockCopy, BlockManager, CachedPrefix
from engine.messages import SamplingParams
from engine.prefix_hash import block_hashes
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

BS = 4


def make_seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=4, temperature=0.0), 0.0)


def compute(blocks: BlockManager, seq: Sequence, prefix: CachedPrefix | None = None) -> None:
    """Admit `seq` with `prefix`, 'compute' its whole prompt and register what is full."""
    blocks.allocate(seq, seq.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    blocks.register_computed(seq)


def test_hash_chains_over_previous_blocks_and_salt():
    tokens = list(range(12))
    base = block_hashes(tokens, BS, 0, 3, None, b"")
    assert base == block_hashes(tokens, BS, 0, 3, None, b"")
    assert len(set(base)) == 3
    # The same third block after a different first block is a different block.
    other = block_hashes([99] + tokens[1:], BS, 0, 3, None, b"")
    assert other[2] != base[2]
    # Another adapter version: nothing matches.
    assert not set(block_hashes(tokens, BS, 0, 3, None, b"lora" + (1).to_bytes(8, "little"))) & set(base)
    # Extending from the middle continues the chain.
    assert block_hashes(tokens, BS, 1, 3, base[0], b"") == base[1:]


def test_shared_prefix_is_reused_and_reference_counted():
    blocks = BlockManager(16, BS, prefix_caching=True)
    first = make_seq("a", list(range(10)))  # blocks 0-1 full, block 2 partial
    compute(blocks, first)
    second = make_seq("b", list(range(8)) + [50, 51, 52])
    prefix = blocks.cached_prefix(second)
    assert prefix == CachedPrefix(first.block_table[:2])  # first's third block is not full: no tail
    compute(blocks, second, prefix)
    assert second.block_table[:2] == first.block_table[:2]
    assert [blocks.ref_counts[b] for b in prefix.blocks] == [2, 2]
    assert second.block_table[2] != first.block_table[2]
    blocks.free(first)
    assert [blocks.ref_counts[b] for b in prefix.blocks] == [1, 1]
    blocks.free(second)
    assert blocks.num_free_blocks == 16  # cached blocks count as free: allocation may evict them
    assert blocks.cached_prefix(make_seq("c", list(range(9)))) == prefix  # contents kept


def test_prefix_leaves_the_last_prompt_token_to_compute():
    """A prompt that ends on a block boundary reuses its last block only as a tail, up to
    its last token: that token's logits are needed, so at least it is computed."""
    blocks = BlockManager(16, BS, prefix_caching=True)
    a = make_seq("a", list(range(8)))
    compute(blocks, a)
    again = blocks.cached_prefix(make_seq("b", list(range(8))))
    assert again == CachedPrefix(a.block_table[:1], tail_source=a.block_table[1], tail_tokens=3)
    assert again.num_tokens(BS) == 7
    assert blocks.cached_prefix(make_seq("c", list(range(9)))) == CachedPrefix(a.block_table[:2])


def test_a_tail_copies_the_leading_tokens_of_a_block_that_continues_the_chain():
    """The next turn of a conversation: the previous prompt ends inside a block that also
    holds the model's answer; the tokens they share are copied, not recomputed."""
    blocks = BlockManager(16, BS, prefix_caching=True)
    turn = make_seq("turn-1", list(range(12)))  # three full blocks: its prompt, then its answer
    compute(blocks, turn)
    nxt = make_seq("turn-2", list(range(10)) + [70, 71, 72])
    prefix = blocks.cached_prefix(nxt)
    assert prefix == CachedPrefix(turn.block_table[:2], tail_source=turn.block_table[2], tail_tokens=2)
    copy = blocks.allocate(nxt, nxt.num_tokens, prefix)
    assert copy == BlockCopy(turn.block_table[2], nxt.block_table[2], 2)
    assert nxt.block_table[2] != turn.block_table[2]  # a cached block is never written
    assert blocks.ref_counts[turn.block_table[2]] == 1  # the source is read, not held
    # Another chain before the same tokens: not a continuation.
    other = make_seq("other", list(range(4)) + [90, 91, 92, 93] + [8, 9, 70])
    assert blocks.cached_prefix(other) == CachedPrefix(turn.block_table[:1])
    # The tail, too, stops before the last prompt token.
    assert blocks.cached_prefix(make_seq("short", list(range(11)))).tail_tokens == 2


def test_a_tail_takes_the_continuation_that_agrees_longest():
    blocks = BlockManager(16, BS, prefix_caching=True)
    short, long_ = make_seq("short", [0, 1, 2, 3, 4, 9, 9, 9]), make_seq("long", [0, 1, 2, 3, 4, 5, 9, 9])
    compute(blocks, long_)
    compute(blocks, short)  # registered last, so compared first
    prefix = blocks.cached_prefix(make_seq("next", [0, 1, 2, 3, 4, 5, 6, 7, 8]))
    assert prefix == CachedPrefix(long_.block_table[:1], tail_source=long_.block_table[1], tail_tokens=2)


@pytest.mark.parametrize("newer", [31, 32])
def test_a_tail_compares_only_the_32_most_recent_continuations(newer):
    """A flood of continuations of one chain that begin with the same token cannot make
    admission compare them all: beyond the 32 most recently registered, none is looked at."""
    blocks = BlockManager(2 * (newer + 2), BS, prefix_caching=True)
    compute(blocks, make_seq("oldest", [0, 1, 2, 3, 4, 5, 6, 7]))
    for i in range(newer):
        compute(blocks, make_seq(f"newer{i}", [0, 1, 2, 3, 4, 100 + i, 0, 0]))
    found = blocks.cached_prefix(make_seq("next", [0, 1, 2, 3, 4, 5, 6, 9, 9]))
    assert found.tail_tokens == (3 if newer < 32 else 1)


def test_a_tail_source_evicted_into_the_same_table_is_its_own_target():
    """With nothing free, the allocation may evict the very block the tail reads: the copy
    then keeps its slots in place, and the block leaves the cache."""
    blocks = BlockManager(3, BS, prefix_caching=True)
    turn = make_seq("turn-1", list(range(12)))
    compute(blocks, turn)
    third = turn.block_table[2]
    blocks.free(turn)  # the third block is the least recently used
    nxt = make_seq("turn-2", list(range(10)) + [70])
    prefix = blocks.cached_prefix(nxt)
    source = prefix.tail_source
    assert source == third and prefix.tail_tokens == 2
    assert blocks.allocate(nxt, nxt.num_tokens, prefix) == BlockCopy(source, source, 2)
    assert blocks.block_hash[source] is None and not any(source in c for c in blocks.continuations.values())


def test_a_finished_request_s_partial_block_is_a_tail_source_until_evicted():
    """The next turn resends the model's reply, whose last computed tokens sit in the
    finished request's partial block: a tail source, held in the LRU without a hash."""
    blocks = BlockManager(4, BS, prefix_caching=True)
    turn = make_seq("turn-1", list(range(11)))
    compute(blocks, turn)  # two full blocks, then three tokens
    table = list(turn.block_table)
    partial = table[2]
    blocks.free(turn, finished=True)
    assert partial in blocks.evictable and partial not in blocks.free_blocks
    assert blocks.block_hash[partial] is None  # never a whole cached block
    nxt = make_seq("turn-2", list(range(12)) + [70])
    assert blocks.cached_prefix(nxt) == CachedPrefix(table[:2], tail_source=partial, tail_tokens=3)
    # Evicted (the last free block, then the LRU): it leaves the index.
    blocks.allocate(make_seq("filler", list(range(100, 108))), 8)
    assert partial not in blocks.evictable and blocks.continuation_key[partial] is None
    assert blocks.cached_prefix(nxt).tail_source is None


def test_a_released_training_sequence_leaves_no_partial_block():
    """Freed without `finished` (a training sequence, whose adapter changes every step),
    the partial block goes back to the free pool and serves no tail."""
    blocks = BlockManager(4, BS, prefix_caching=True)
    seq = make_seq("train", list(range(11)))
    compute(blocks, seq)
    partial = seq.block_table[2]
    blocks.free(seq)
    assert partial in blocks.free_blocks and blocks.continuation_key[partial] is None
    assert blocks.cached_prefix(make_seq("next", list(range(12)) + [70])).tail_source is None


def test_eviction_takes_never_used_blocks_first_then_least_recently_freed_tail_first():
    blocks = BlockManager(6, BS, prefix_caching=True)
    old, new = make_seq("old", list(range(8))), make_seq("new", list(range(100, 108)))
    compute(blocks, old)
    compute(blocks, new)
    first_of_old = old.block_table[0]
    blocks.free(old)
    blocks.free(new)
    assert len(blocks.free_blocks) == 2 and len(blocks.evictable) == 4
    taker = make_seq("taker", list(range(200, 212)))  # three blocks
    blocks.allocate(taker, 12)
    # Two never-used blocks, then old's tail block (freed first within the oldest sequence).
    assert blocks.counters.evictions == 1
    assert old.block_hashes[1] not in blocks.cached and old.block_hashes[0] in blocks.cached
    assert all(h in blocks.cached for h in new.block_hashes)
    # old's first block still matches; its second, evicted, is not even a tail.
    assert blocks.cached_prefix(make_seq("again", list(range(9)))) == CachedPrefix([first_of_old])


def test_reviving_a_cached_block_takes_it_from_the_free_pool():
    blocks = BlockManager(3, BS, prefix_caching=True)
    first = make_seq("a", list(range(8)))
    compute(blocks, first)
    blocks.free(first)
    second = make_seq("b", list(range(8)) + [9])
    prefix = blocks.cached_prefix(second)
    assert len(prefix.blocks) == 2
    assert blocks.blocks_needed(second, 9, prefix) == 3  # 2 revived + 1 new
    assert blocks.can_allocate(second, 9, prefix)
    assert not blocks.can_allocate(second, 13, prefix)
    compute(blocks, second, prefix)
    assert blocks.num_free_blocks == 0


def test_duplicate_contents_keep_the_first_registration():
    blocks = BlockManager(8, BS, prefix_caching=True)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    blocks.allocate(a, 5)
    blocks.allocate(b, 5)  # both computed the same prefix at once
    for seq in (a, b):
        seq.num_computed_tokens = 5
        blocks.register_computed(seq)
    assert blocks.cached[a.block_hashes[0]] == a.block_table[0]
    blocks.free(b)
    assert b.block_table == [] and len(blocks.evictable) == 0  # b's copy went back unregistered


def test_caching_off_never_matches():
    blocks = BlockManager(8, BS, prefix_caching=False)
    compute(blocks, make_seq("a", list(range(9))))
    assert blocks.cached_prefix(make_seq("b", list(range(9)))) == CachedPrefix()
    assert not blocks.cached and not blocks.continuations


def test_pins_hold_blocks_until_they_expire():
    blocks = BlockManager(4, BS, prefix_caching=True, max_pinned_blocks=2)
    seq = make_seq("agent", list(range(9)))
    compute(blocks, seq)
    assert blocks.pin(seq, until=10.0)
    assert seq.block_table == [] and blocks.num_pinned_blocks == 2
    assert blocks.num_free_blocks == 2  # the partial block was freed; the pinned two are held
    with pytest.raises(RuntimeError):
        blocks.allocate(make_seq("pressure", list(range(50, 62))), 12)  # cannot evict pinned blocks
    blocks.expire_pins(9.9)
    assert blocks.num_pinned_blocks == 2
    blocks.expire_pins(10.0)
    assert blocks.num_pinned_blocks == 0 and blocks.counters.pin_expiries == 1
    assert len(blocks.cached_prefix(make_seq("next-turn", list(range(12)))).blocks) == 2


def test_a_pin_over_the_bound_is_refused_and_freed():
    blocks = BlockManager(8, BS, prefix_caching=True, max_pinned_blocks=1)
    seq = make_seq("big", list(range(9)))
    compute(blocks, seq)
    assert not blocks.pin(seq, until=10.0)
    assert blocks.counters.pins_refused == 1 and blocks.num_pinned_blocks == 0
    assert blocks.num_free_blocks == 8


def test_a_sequence_with_nothing_cached_is_not_pinned_nor_counted_refused():
    blocks = BlockManager(8, BS, prefix_caching=True, max_pinned_blocks=4)
    assert not blocks.pin(make_seq("aborted-while-waiting", list(range(9))), until=10.0)
    assert (blocks.counters.pins, blocks.counters.pins_refused, blocks.num_pinned_blocks) == (0, 0, 0)
