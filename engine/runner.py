"""ModelRunner: runs an `IterationPlan` on the model and samples.

`execute(plan)` takes the plan's forward out as plain data (`ForwardBatch`,
engine/forward_batch.py) and runs it (`run`, what every tensor-parallel rank runs);
then samples and computes logprobs, on this rank only. `run` turns the batch into
tensors in one place:
  input_ids, positions, slot_mapping: [num_tokens] for every scheduled token, in
    plan order (decodes first, then prefill chunks, then finetuning chunks);
  decode block tables [num_decodes, max_blocks] and a validity mask over the
    gathered context, shared by all layers;
  one PrefillSpan per prefill chunk;
  a `LoRABatch` grouping the tokens by adapter slot, when any sequence has one;
and puts the rows that need logits through the LM head in one call: the last token of
each chunk that completes its sequence (it is sampled), and the positions whose prompt
logprobs are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine import ops
from engine.attention import AttentionMetadata, PrefillSpan, chunk_mask, prefill_kernel_is_faster
from engine.forward_batch import ForwardBatch, forward_batch
from engine.lora.backend import LoRABackend, LoRAContext
from engine.messages import TokenLogprobs
from engine.model.llama import LlamaForCausalLM
from engine.model.rope import rope_tables
from engine.plan import IterationPlan, ScheduledChunk
from engine.sampler import mask_by_grammar, sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Prompt logprobs gained this iteration, per request, in prompt order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Finetuning chunks' layer inputs, per training sequence id (see ModelRunner.forward).
    captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        device: str,
        use_kernels: bool | None = None,
        lora_backend: LoRABackend | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        """use_kernels: None = use the csrc/ kernels where they build and take the model's
        type, False = native PyTorch only.
        lora_backend: computes the LoRA deltas of the tokens whose sequences have an
        adapter slot (None: a model served without adapters).
        kv_dtype: the KV cache's type (config.resolve_kv_cache_dtype); None = the model's."""
        self.model = model
        self.lora_backend = lora_backend
        # Tensor parallelism: sends each batch to the other ranks before rank 0 runs it
        # (engine/parallel/workers.py); None on one device.
        self.broadcast: Callable[[ForwardBatch], None] | None = None
        self.block_size = block_size
        self.device = device
        self.dtype = dtype = model.embed_tokens.weight.dtype
        if use_kernels is None:
            use_kernels = device == "cpu" and dtype in ops.CPU_KERNEL_DTYPES and ops.cpu_kernels_available()
        self.use_kernels = use_kernels
        model.set_fused_kernels(use_kernels)
        # Prefill chunks on the AMX kernel where it builds, takes this model and measures
        # faster than SDPA on this CPU (attention.prefill_kernel_is_faster).
        self.prefill_kernel = (
            use_kernels and dtype == torch.bfloat16 and model.head_dim % 32 == 0 and ops.prefill_attention_available()
            and prefill_kernel_is_faster(model.num_heads, model.num_kv_heads,
                                         model.head_dim, block_size)
        )
        if use_kernels and dtype == torch.bfloat16:
            log.info("prefill attention: %s", "the AMX kernel (measured faster than SDPA here)" if self.prefill_kernel
                     else "SDPA (the AMX kernel is unavailable or measured slower here)")
        config = model.config
        # Per layer (k, v), each [num_blocks, block_size, kv_heads, head_dim].
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_dtype = kv_dtype = kv_dtype or dtype
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        cos, sin = rope_tables(config, model.head_dim, max_model_len)
        self.cos, self.sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        config = model.config
        per_token = 2 * config.num_hidden_layers * model.num_kv_heads * model.head_dim
        return per_token * block_size * torch.empty(0, dtype=dtype).element_size()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        bs = self.block_size
        num_decodes = batch.num_decodes
        decodes = batch.chunks[:num_decodes]
        max_blocks = max((len(c.block_table) for c in decodes), default=0)
        tables = []
        for c in decodes:
            tables.extend(c.block_table + [0] * (max_blocks - len(c.block_table)))  # padding is masked out
        context_lens = self._tensor([c.end for c in decodes])  # [num_decodes]
        decode_mask = None
        if not self.use_kernels:
            decode_mask = torch.arange(max_blocks * bs, device=self.device) < context_lens.unsqueeze(1)
            decode_mask = decode_mask.view(num_decodes, 1, 1, max_blocks * bs)
        prefills = []
        offset = num_decodes
        for c in batch.chunks[num_decodes:]:
            mask = None
            if c.start > 0 and not self.prefill_kernel:
                mask = chunk_mask(c.num_tokens, c.start, self.dtype, self.device)  # [chunk, context]
            prefills.append(PrefillSpan(offset, c.num_tokens, c.start, self._tensor(c.block_table), mask))
            offset += c.num_tokens
        return AttentionMetadata(
            slot_mapping=self._tensor(batch.cache_slots),
            num_decode_tokens=num_decodes,
            decode_block_tables=self._tensor(tables).view(num_decodes, max_blocks),
            decode_context_lens=context_lens,
            decode_mask=decode_mask,
            prefills=prefills,
            prefill_kernel=self.prefill_kernel,
        )

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """The forward every tensor-parallel rank runs alike: (hidden states [num_tokens,
        hidden], float32 logits of batch.logits_rows [rows, vocab] or None, and the
        finetuning rows' layer inputs: one [num_finetune_tokens, hidden] per layer and
        one for the last layer's output; empty without finetuning tokens)."""
        if self.broadcast is not None:
            self.broadcast(batch)
        for copy in batch.kv_copies:
            for k_cache, v_cache in self.kv_caches:  # [num_blocks, block_size, kv_heads, head_dim]
                k_cache[copy.target, : copy.num_tokens] = k_cache[copy.source, : copy.num_tokens]
                v_cache[copy.target, : copy.num_tokens] = v_cache[copy.source, : copy.num_tokens]
        meta = self._metadata(batch)
        pos = self._tensor(batch.positions)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [num_tokens, head_dim]
        lora = self._lora_context(batch.lora_slots)
        per_layer: list[torch.Tensor] = []
        rows = None
        if batch.num_finetune_tokens:
            rows = torch.arange(batch.num_tokens - batch.num_finetune_tokens, batch.num_tokens, device=self.device)
        hidden = self.model(self._tensor(batch.input_ids), cos, sin, self.kv_caches, meta, lora, rows, per_layer)
        logits = None
        if batch.logits_rows:
            logits = self.model.compute_logits(hidden[self._tensor(batch.logits_rows)])
        return hidden, logits, per_layer

    @torch.inference_mode()
    def forward(self, plan: IterationPlan, captured: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Run the model over the plan's flat batch (inference chunks, then finetuning
        chunks); returns hidden states [num_tokens, hidden]. With `captured`, fills it
        with each finetuning chunk's layer inputs (per sequence id, one [chunk, hidden]
        tensor per layer and one for the last layer's output)."""
        batch = forward_batch(plan, self.block_size, [])
        hidden, _, per_layer = self.run(batch)
        if captured is not None:
            captured.update(batch.captured_by_sequence(per_layer))
        return hidden

    def _lora_context(self, lora_slots: list[int]) -> LoRAContext | None:
        if self.lora_backend is None:
            return None
        batch = self.lora_backend.make_batch(lora_slots, self.device)
        return None if batch is None else LoRAContext(self.lora_backend, batch)

    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> RunnerOutput:
        out = RunnerOutput()
        sample_rows: list[int] = []
        sample_chunks: list[ScheduledChunk] = []
        prompt_rows: dict[str, tuple[ScheduledChunk, list[int], list[int]]] = {}  # request -> (chunk, rows, targets)
        row0 = 0
        for chunk in plan.chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            if chunk.completes_sequence:
                sample_rows.append(row0 + chunk.num_new_tokens - 1)
                sample_chunks.append(chunk)
            if seq.wants_prompt_logprobs():
                # Position p predicts prompt token p + 1.
                first = max(start, len(seq.prompt_logprobs))
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows[seq.request_id] = (chunk, [row0 + p - start for p in range(first, last)],
                                                   seq.token_ids[first + 1 : last + 1])
            row0 += chunk.num_new_tokens
        logits_rows = sample_rows + [row for _, rows, _ in prompt_rows.values() for row in rows]
        batch = forward_batch(plan, self.block_size, logits_rows)
        _, all_logits, per_layer = self.run(batch)
        out.captured = batch.captured_by_sequence(per_layer)

        if sample_rows:
            seqs = [c.seq for c in sample_chunks]
            logits = all_logits[: len(sample_rows)]  # [n, vocab]
            mask_by_grammar(logits, seqs)
            wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
            raw_logprobs = F.log_softmax(logits[wanted], dim=-1) if wanted else None
            tokens = sample(logits, seqs)
            for seq, token in zip(seqs, tokens):
                out.sampled[seq.request_id] = token
            if wanted:
                num_top = max(seqs[i].params.logprobs for i in wanted)
                chosen = self._tensor([tokens[i] for i in wanted])
                for i, entry in zip(wanted, token_logprobs(raw_logprobs, chosen, num_top)):
                    out.logprobs[seqs[i].request_id] = (entry[0], entry[1][: seqs[i].params.logprobs])
        offset = len(sample_rows)
        for request_id, (chunk, rows, targets) in prompt_rows.items():
            logprobs = F.log_softmax(all_logits[offset : offset + len(rows)], dim=-1)
            offset += len(rows)
            num_top = chunk.seq.params.prompt_logprobs
            out.prompt_logprobs[request_id] = token_logprobs(logprobs, self._tensor(targets), num_top)
        return out
