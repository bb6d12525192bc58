"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A sequence's `block_table` maps its logical block i (tokens [i*block_size,
(i+1)*block_size)) to a physical block. A block may be shared: its reference count is
the number of sequences (and pins, see below) whose tables hold it.

Prefix caching. Once a block is full and its KV computed, it is registered under a
hash chained over its tokens, the previous block's hash and the adapter that computed
it (engine/prefix_hash.py), so that a later sequence whose tokens start the same way
can take the block instead of recomputing it. A block whose last holder lets go keeps
its contents and hash in an LRU of evictable blocks: a later match revives it, and
allocation takes never-used or unregistered blocks first, then evicts the least
recently freed cached block. A sequence frees its blocks tail first, so its deepest
blocks, the least likely to be shared, are evicted before its first ones.

Where the chain of whole blocks ends, a lookup also takes the leading tokens of a cached
block that continues the same chain (same previous block, same adapter) as far as its
tokens agree with the sequence's: the next turn of a conversation shares the previous
prompt to its last token, but the block holding that token also holds what the model
answered, so no whole block matches it. Those tokens' KV is copied into a block of the
sequence's own before the forward (`BlockCopy`; a cached block is never written), and
only the rest is computed: in a 4-turn chat with 300-token system prompts (2026-12-07,
bench/bench_prefix.py) about 8 tokens a turn of ~175 computed. A finished request's
last, partial block is such a source too (never a whole cached block): a chat's next
turn resends the model's reply, whose last tokens sit there; it stays in the LRU like a
cached block until it is evicted.

Pins. A finished request may ask that its KV outlive it for a while (an agent's next
turn after a tool call): its blocks stay referenced by a pin until the pin expires, so
LRU eviction cannot take them. Pinned blocks are bounded (`max_pinned_blocks`): a pin
that would exceed the bound is not made and its blocks become evictable as usual.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.prefix_hash import block_hashes
from engine.sequence import Sequence


@dataclass
class PrefixCacheCounters:
    """Cumulative, in vLLM's meaning: prompt tokens looked up, and of those, found cached."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0  # cached blocks taken for new contents
    pins: int = 0  # pins made
    pins_refused: int = 0  # pins not made: the bound on pinned blocks was reached
    pin_expiries: int = 0  # pins that ran out (their blocks became evictable)


@dataclass(frozen=True)
class BlockCopy:
    """KV of slots [0, num_tokens) of block `source` to the same slots of `target`, in
    every layer, before an iteration's forward. Copies run in the order planned: a later
    one may take as its target a cached block an earlier one reads (it was evictable),
    never the other way round, and the forward writes only after all of them."""

    source: int
    target: int
    num_tokens: int


@dataclass
class CachedPrefix:
    """What a lookup found for a sequence: whole cached blocks, then possibly the leading
    `tail_tokens` tokens of the cached block `tail_source` (see the module docstring)."""

    blocks: list[int] = field(default_factory=list)
    tail_source: int | None = None
    tail_tokens: int = 0

    def num_tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.tail_tokens


# How many cached blocks a lookup compares for its tail, most recently registered first:
# continuations of one chain that begin with the same token are few in any real workload,
# and the bound keeps a crafted flood of them from slowing admission.
_TAIL_CANDIDATES = 32


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, max_pinned_blocks: int = 0):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.max_pinned_blocks = max_pinned_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unreferenced, nothing cached
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> the block that holds it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        # Registered blocks by (adapter salt, previous block's hash or b"", first token),
        # with their tokens: where a lookup's tail looks (see the module docstring).
        self.continuations: dict[tuple[bytes, bytes, int], dict[int, tuple[int, ...]]] = {}
        self.continuation_key: list[tuple[bytes, bytes, int] | None] = [None] * num_blocks
        self.counters = PrefixCacheCounters()
        # Pins: (expiry, pin id) in a heap; pin id -> its blocks.
        self._pin_expiries: list[tuple[float, int]] = []
        self._pinned: dict[int, list[int]] = {}
        self._pin_ids = itertools.count()
        self.num_pinned_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used ones and evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix lookup ----------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The longest cached chain of `seq`'s leading full blocks, then the longest run of
        its next tokens that a cached block continuing that chain begins with, leaving at
        least its last token to compute (its logits are needed). Nothing is taken yet:
        `allocate(..., prefix=...)` does that."""
        prefix = CachedPrefix()
        if not self.prefix_caching:
            return prefix
        limit = (seq.num_tokens - 1) // self.block_size
        digests = self._hashes(seq, limit)
        for digest in digests:
            block = self.cached.get(digest)
            if block is None:
                break
            prefix.blocks.append(block)
        start = len(prefix.blocks) * self.block_size
        wanted = seq.token_ids[start : min(start + self.block_size - 1, seq.num_tokens - 1)]
        if wanted:
            parent = digests[len(prefix.blocks) - 1] if prefix.blocks else b""
            candidates = self.continuations.get((seq.cache_salt, parent, wanted[0]), {})
            for block in itertools.islice(reversed(candidates), _TAIL_CANDIDATES):
                agreed = common_prefix_length(candidates[block], wanted)
                if agreed > prefix.tail_tokens:
                    prefix.tail_source, prefix.tail_tokens = block, agreed
        return prefix

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.counters.queries += prompt_tokens
        self.counters.hits += cached_tokens

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chained hashes of `seq`'s first `num_blocks` full blocks, extended as needed
        (they stay valid across preemption: a sequence's tokens only grow)."""
        if len(seq.block_hashes) < num_blocks:
            seq.block_hashes.extend(
                block_hashes(seq.token_ids, self.block_size, len(seq.block_hashes), num_blocks,
                             seq.block_hashes[-1] if seq.block_hashes else None, seq.cache_salt)
            )
        return seq.block_hashes[:num_blocks]

    # -- allocation ---------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int, prefix: CachedPrefix | None = None) -> int:
        """Blocks an allocation of `seq`'s first `num_tokens` tokens takes from the free
        pool: new blocks, and cached prefix blocks that nobody holds (they leave the LRU)."""
        blocks = prefix.blocks if prefix is not None else []
        total = -(-num_tokens // self.block_size)
        revived = sum(1 for block in blocks if self.ref_counts[block] == 0)
        return max(0, total - len(seq.block_table) - len(blocks)) + revived

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens, prefix) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, prefix: CachedPrefix | None = None) -> BlockCopy | None:
        """Grow `seq.block_table` to cover `num_tokens` tokens, starting with the cached
        `prefix` (only for a sequence that holds no blocks yet). Returns the copy that
        fills the first new block with the prefix's tail, if it has one; the copy must
        run before the next forward."""
        needed = self.blocks_needed(seq, num_tokens, prefix)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {needed}, have {self.num_free_blocks}")
        if prefix is not None:
            assert not seq.block_table, "a cached prefix starts an empty block table"
            for block in prefix.blocks:
                self._hold(block)
            seq.block_table.extend(prefix.blocks)
            seq.num_registered_blocks = len(prefix.blocks)
        total = -(-num_tokens // self.block_size)
        while len(seq.block_table) < total:
            block = self._take_free()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if prefix is None or prefix.tail_source is None:
            return None
        # The source may just have been evicted into this very table (then it is its
        # own target, and the copy leaves its slots as they are).
        return BlockCopy(prefix.tail_source, seq.block_table[len(prefix.blocks)], prefix.tail_tokens)

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def _take_free(self) -> int:
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)
        if self.block_hash[block] is not None:  # else a finished request's partial block
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        key = self.continuation_key[block]
        siblings = self.continuations[key]
        del siblings[block]
        if not siblings:
            del self.continuations[key]
        self.continuation_key[block] = None
        self.counters.evictions += 1
        return block

    def free(self, seq: Sequence, finished: bool = False) -> None:
        """Release `seq`'s blocks. `finished`: an inference request that ended, whose last,
        partial block then stays a source of tails (see the module docstring); never for
        a training sequence, whose adapter changes with every step."""
        if finished and self.prefix_caching:
            self._keep_partial_block(seq)
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _keep_partial_block(self, seq: Sequence) -> None:
        """Index the computed tokens of `seq`'s last block, where it is partial, as a
        continuation of its chain of registered blocks."""
        full, computed = divmod(seq.num_computed_tokens, self.block_size)
        if computed == 0 or full >= len(seq.block_table) or full != seq.num_registered_blocks:
            return
        block = seq.block_table[full]
        if self.ref_counts[block] != 1 or self.continuation_key[block] is not None:
            return
        tokens = tuple(seq.token_ids[full * self.block_size : full * self.block_size + computed])
        key = (seq.cache_salt, seq.block_hashes[full - 1] if full else b"", tokens[0])
        self.continuations.setdefault(key, {})[block] = tokens
        self.continuation_key[block] = key

    def _release(self, blocks) -> None:
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None and self.continuation_key[block] is None:
                    self.free_blocks.append(block)
                else:
                    self.evictable[block] = None  # most recently used: evicted last

    # -- registration -----------------------------------------------------------------

    def register_computed(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that are now full and computed. A block whose contents
        another block already holds (two requests computed the same prefix at once)
        stays unregistered: the first copy serves later lookups."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        digests = self._hashes(seq, full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, full):
            block, digest = seq.block_table[i], digests[i]
            if self.block_hash[block] is None and digest not in self.cached:
                self.block_hash[block] = digest
                self.cached[digest] = block
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                key = (seq.cache_salt, digests[i - 1] if i else b"", tokens[0])
                self.continuations.setdefault(key, {})[block] = tokens
                self.continuation_key[block] = key
        seq.num_registered_blocks = full

    # -- pins -------------------------------------------------------------------------

    def pin(self, seq: Sequence, until: float) -> bool:
        """Keep the blocks of `seq`'s cached chain referenced until `until` (a monotonic time), then
        free its table. False (plain free) when it has nothing cached or the pin would exceed
        `max_pinned_blocks` (counted as refused)."""
        blocks = []  # the blocks that hold its cached chain (a duplicate holds none)
        for digest in seq.block_hashes[: seq.num_registered_blocks]:
            if digest not in self.cached:
                break
            blocks.append(self.cached[digest])
        if not blocks:  # nothing cached to keep (e.g. aborted while waiting)
            self.free(seq, finished=True)
            return False
        fits = self.num_pinned_blocks + len(blocks) <= self.max_pinned_blocks
        if fits:
            for block in blocks:
                self._hold(block)
            pin_id = next(self._pin_ids)
            self._pinned[pin_id] = blocks
            heapq.heappush(self._pin_expiries, (until, pin_id))
            self.num_pinned_blocks += len(blocks)
            self.counters.pins += 1
        else:
            self.counters.pins_refused += 1
        self.free(seq, finished=True)
        return fits

    def expire_pins(self, now: float) -> None:
        """Release the pins whose time is up; their blocks become evictable."""
        while self._pin_expiries and self._pin_expiries[0][0] <= now:
            _, pin_id = heapq.heappop(self._pin_expiries)
            blocks = self._pinned.pop(pin_id)
            self.num_pinned_blocks -= len(blocks)
            self.counters.pin_expiries += 1
            self._release(reversed(blocks))


def common_prefix_length(a: Iterable[int], b: Iterable[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
