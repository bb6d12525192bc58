"""`Sequence`: the one object the scheduler, block manager and runner pass around.

A sequence is tracked by token counts only: `num_computed_tokens` of its
`token_ids` have KV entries in the cache. Whatever is left is scheduled in chunks;
there is no prefill or decode mode. When `num_computed_tokens` reaches
`num_tokens` after an iteration, the runner samples one new token for it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from engine.messages import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

    from engine.lora.manager import AdapterEntry


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        lora: AdapterEntry | None = None,
    ):
        self.request_id = request_id
        self.lora = lora  # None = the base model
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix caching (engine/block_manager.py): chained hashes of its full blocks so
        # far, how many of its table's blocks are registered in the cache, and how many
        # prompt tokens its first admission found cached (usage.cached_tokens).
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens: int | None = None
        # Seconds its KV stays pinned after it finishes (None: freed at once).
        self.kv_ttl_s: float | None = None
        # Guided decoding: where the output stands in the request's grammar. It advances
        # once per token appended (Scheduler.update), so a recompute after preemption,
        # which appends nothing until its next sample, leaves it where it was.
        self.grammar: GrammarMatcher | None = None
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.num_preemptions = 0
        # Per-request generator: a seeded request samples the same tokens whatever
        # else shares its batches.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        # Collected across prefill chunks, sent once with the first output.
        self.prompt_logprobs: list[TokenLogprobs] | None = [] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        # This request's SLOs in seconds, its own or the engine's (set on admission; None
        # for training sequences). Finetuning keeps the iterations it runs in within the
        # strictest TPOT; the governor honours both.
        self.ttft_slo_s: float | None = None
        self.tpot_slo_s: float | None = None
        # When it first got a chunk in an iteration (queue time), and the energy
        # attributed to it so far.
        self.first_scheduled_time: float | None = None
        self.energy_joules = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def lora_slot(self) -> int:
        """Compute slot of this sequence's adapter while it runs; -1 for the base model."""
        return -1 if self.lora is None else self.lora.slot

    @property
    def cache_salt(self) -> bytes:
        """What besides its tokens decides its KV: the adapter version (none for the base model)."""
        return b"" if self.lora is None else b"lora" + self.lora.version.to_bytes(8, "little")

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        """Still collecting prompt logprobs (a recompute after preemption does not redo them)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
