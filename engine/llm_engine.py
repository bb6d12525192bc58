"""LLMEngine: the engine step, `schedule -> execute -> update`, and its bookkeeping."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import msgspec
import torch
from transformers import AutoTokenizer

from engine.block_manager import BlockManager
from engine.coserving_policy import CoServingPolicy
from engine import ops
from engine.attention import bfloat16_cache_is_no_slower
from engine.config import EngineConfig, dtype_name, explicit_dtype, resolve_kv_cache_dtype, resolve_panel_rows
from engine.finetune.coordinator import FinetuneCoordinator
from engine.finetune.runs import FinetuneRuns
from engine.grammar.compiler import GrammarCompiler, GrammarError
from engine.iteration_observers import IterationObserver, LatencyFit, PowerAccounting
from engine.latency_model import IterationShape, LatencyModel
from engine.lora.adapter import AdapterError
from engine.lora.manager import LoRAManager
from engine.messages import EngineReady, EngineRequest, IterationStats, RequestOutput
from engine.model import gemm_probe
from engine.model.llama import LlamaForCausalLM, head_dim_of
from engine.model.loader import load_config, load_model
from engine.parallel.tensor_parallel import check_divides
from engine.parallel.workers import TensorParallelRanks, threads_per_rank
from engine.plan import IterationPlan, iteration_shape
from engine.power.governor import LoadState
from engine.power.load_projection import ArrivalTracker, project_load
from engine.power.monitor import PowerMonitor
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence

log = logging.getLogger(__name__)


def _eos_token_ids(config, model_dir) -> set[int]:
    """EOS ids from config.json and generation_config.json (chat models often list several)."""
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def _compute_types(config: EngineConfig) -> tuple[torch.dtype, int, int, int | None]:
    """The compute type, up to how many rows linears read bfloat16 panels, up to how many
    they run on oneDNN-packed weights, and the prefill pack size; on a CPU with
    `dtype: auto` all four as measured (engine/model/gemm_probe.py), where not set."""
    dtype = explicit_dtype(config.dtype, config.device)
    probed_rows = packed_rows = 0
    pack_tokens = config.prefill_pack_tokens
    if dtype is None:
        choice = gemm_probe.choose(load_config(config.model_dir), config.cache_dir)
        dtype, probed_rows = getattr(torch, choice.dtype), choice.panel_max_rows
        packed_rows = choice.packed_max_rows
        pack_tokens = pack_tokens or choice.prefill_pack_rows
        log.info("CPU GEMM probe: %s, bfloat16 panels up to %d rows, oneDNN-packed up to %d, prefills packed to "
                 "%d (ms: %s)", choice.dtype, probed_rows, packed_rows, choice.prefill_pack_rows, choice.timings_ms)
    panel_rows = resolve_panel_rows(config.decode_weights, config.dtype, config.device, probed_rows)
    return dtype, panel_rows, packed_rows, pack_tokens


def kv_cache_blocks(config: EngineConfig, model: LlamaForCausalLM, kv_dtype: torch.dtype) -> int:
    """KV blocks that fit kv_cache_memory_gb (per tensor-parallel rank: each caches its KV heads)."""
    return int(config.kv_cache_memory_gb * 2**30 // ModelRunner.kv_bytes_per_block(model, config.block_size, kv_dtype))


def _kv_cache_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's type (config.resolve_kv_cache_dtype), timing the decode kernel on
    both caches where `auto` leaves it to this CPU."""
    model_config = load_config(config.model_dir)
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim = head_dim_of(model_config)
    kernels = config.device == "cpu" and ops.cpu_kernels_available()
    return resolve_kv_cache_dtype(config.kv_cache_dtype, config.dtype, dtype, config.device, kernels,
                                  lambda: bfloat16_cache_is_no_slower(heads, kv_heads, head_dim, config.block_size))


def model_len_limit(config: EngineConfig, model_config, num_blocks: int) -> int:
    """The longest sequence served: the model's context, the cache, the setting."""
    limits = [model_config.max_position_embeddings, num_blocks * config.block_size]
    if config.max_model_len:
        limits.append(config.max_model_len)
    # Beyond its window Mistral attends only locally; we attend fully, so we stop there.
    window = getattr(model_config, "sliding_window", None)
    if window and getattr(model_config, "use_sliding_window", True):
        limits.append(window)
    return min(limits)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads or config.tensor_parallel_size > 1:
            torch.set_num_threads(threads_per_rank(config))
        self.dtype, self.panel_rows, self.packed_rows, self.prefill_pack_tokens = _compute_types(config)
        self.kv_dtype = _kv_cache_dtype(config, self.dtype)
        # Tensor parallelism: this process is rank 0 and starts the others
        # (engine/parallel/workers.py), once the model is known to split.
        self.ranks = tensor_parallel = None
        if config.tensor_parallel_size > 1:
            check_divides(load_config(config.model_dir), config.tensor_parallel_size)
            self.ranks = TensorParallelRanks(config, self.dtype, self.kv_dtype, self.panel_rows, self.packed_rows)
            tensor_parallel = self.ranks.tp
        self.model = load_model(config.model_dir, self.dtype, config.device, self.panel_rows, self.packed_rows,
                                tensor_parallel)
        model_config = self.model.config

        num_blocks = kv_cache_blocks(config, self.model, self.kv_dtype)
        self.max_model_len = model_len_limit(config, model_config, num_blocks)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, prefix_caching=config.enable_prefix_caching,
            max_pinned_blocks=int(num_blocks * config.max_pinned_kv_fraction) if config.enable_prefix_caching else 0,
        )
        self.loras = LoRAManager(
            self.model.lora_layout(),
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_rank=config.max_lora_rank,
            dtype=self.dtype,
            device=config.device,
            tensor_parallel=tensor_parallel,
        )
        for name, path in config.lora_modules:
            self.load_adapter(name, path)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            eos_token_ids=_eos_token_ids(model_config, config.model_dir),
            adapter_slots=self.loras,
            prefill_pack_tokens=self.prefill_pack_tokens,
        )
        self.grammars = GrammarCompiler(
            lambda: AutoTokenizer.from_pretrained(config.model_dir), model_config.vocab_size, self.scheduler.eos_token_ids
        )
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, self.max_model_len, config.device,
            lora_backend=self.loras.backend, kv_dtype=self.kv_dtype,
        )
        if self.ranks is not None:
            self.ranks.loras = self.loras
            self.runner.broadcast = self.ranks.send
        self.sequences: dict[str, Sequence] = {}
        self.latency = LatencyModel()
        self.policy = CoServingPolicy(
            self.latency, config.tpot_slo_ms / 1000, config.finetune_backward_layers_per_iteration
        )
        self.power = PowerMonitor.create(
            config.power_device, config.power_mode, config.device, self.latency,
            config.ttft_slo_ms, config.tpot_slo_ms, config.max_num_batched_tokens, config.tensor_parallel_size,
        )
        self.arrivals = ArrivalTracker()
        self.finetune = FinetuneCoordinator(self.loras, self.scheduler, config.finetune_backward_layers_per_iteration)
        self.power_accounting = (
            None if self.power is None
            else PowerAccounting(self.power, self.latency, self.policy, self.sequences, self.finetune)
        )
        self.observers: list[IterationObserver] = [LatencyFit(self.latency, self.policy)]
        if self.power_accounting is not None:
            self.observers.insert(0, self.power_accounting)  # charges energy at the costs before the fit moves
        # Jobs' lives (start, pause/resume/cancel, checkpoints, reports): the process loop
        # talks to finetune_runs itself; the iteration only calls after_iteration.
        self.finetune_runs = FinetuneRuns(
            self.finetune, self.model, self.loras.layout, tensor_parallel,
            None if self.ranks is None else self.ranks.send_job_operation,
        )
        log.info(
            "engine ready: %s, dtype=%s%s%s, %d KV blocks of %d tokens (%s), max_model_len=%d%s",
            config.model_dir, dtype_name(self.dtype),
            f" (bfloat16 panels up to {self.panel_rows} rows)" if self.panel_rows else "",
            f" (oneDNN-packed weights up to {self.packed_rows} rows)" if self.packed_rows else "",
            num_blocks, config.block_size, dtype_name(self.kv_dtype), self.max_model_len,
            f", {config.tensor_parallel_size} tensor-parallel ranks" if self.ranks is not None else "",
        )

    def ready_info(self) -> EngineReady:
        return EngineReady(
            max_model_len=self.max_model_len,
            num_kv_blocks=self.block_manager.num_blocks,
            block_size=self.config.block_size,
            dtype=dtype_name(self.dtype),
            power_device=self.power.device.name if self.power else None,
            power_mode=self.power.mode if self.power else "off",
        )

    def close(self) -> None:
        """Finish checkpoint writes and give the GPU clock back (power_mode apply); called
        on every engine exit."""
        self.finetune_runs.close()
        if self.power is not None:
            self.power.close()
        if self.ranks is not None:
            self.ranks.close()

    # -- adapters ---------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        """Register adapter `name`; raises AdapterError (nothing registered) when it is unusable."""
        entry = self.loras.add(name, Path(path))
        log.info("LoRA adapter %r loaded from %s (rank %d)", name, path, entry.weights.rank)

    def unload_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; those already admitted finish normally."""
        self.loras.remove(name)
        log.info("LoRA adapter %r unloaded", name)

    # -- requests -----------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> RequestOutput | None:
        """Queue a request; returns its final (error) output if it cannot run at all."""
        lora = None
        if request.lora_name is not None:
            try:
                lora = self.loras.acquire(request.lora_name)
            except AdapterError as exc:
                return RequestOutput(request.request_id, [], finish_reason="error", error=str(exc))
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, request.arrival_time, lora)
        if request.params.structured is not None:
            try:
                seq.grammar = self.grammars.matcher(request.params.structured)
            except (GrammarError, OSError) as exc:  # OSError: the model has no tokenizer files
                if lora is not None:
                    self.loras.release(lora)
                return RequestOutput(request.request_id, [], finish_reason="error", error=f"structured output: {exc}")
        seq.ttft_slo_s = (request.ttft_slo_ms or self.config.ttft_slo_ms) / 1000
        seq.tpot_slo_s = (request.tpot_slo_ms or self.config.tpot_slo_ms) / 1000
        if request.kv_ttl_s:
            seq.kv_ttl_s = min(request.kv_ttl_s, self.config.max_kv_ttl_s)
        try:
            self.scheduler.add(seq)
        except ValueError as exc:  # the server checks lengths first; this guards the engine itself
            if lora is not None:
                self.loras.release(lora)
            return RequestOutput(request.request_id, [], finish_reason="error", error=str(exc))
        self.sequences[seq.request_id] = seq
        self.arrivals.record(time.time(), len(request.prompt_token_ids))
        return None

    def _forget(self, seq: Sequence) -> None:
        del self.sequences[seq.request_id]
        if seq.lora is not None:
            self.loras.release(seq.lora)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            seq = self.sequences.get(request_id)
            if seq is not None:
                self.scheduler.abort(request_id)
                self._forget(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.finetune.has_work()

    # -- the iteration -----------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], IterationStats]:
        started = time.perf_counter()
        plan = self._schedule(started)
        sampled, logprobs = self._execute(plan)
        shape = iteration_shape(plan, self.finetune.backward_work)
        # Measured before checkpoint writes: the latency model times compute, not disk.
        elapsed = time.perf_counter() - started
        observed = {}
        for observer in self.observers:
            observed |= observer.after_iteration(plan, shape, elapsed)
        outputs = [self._output(request_id, token, logprobs) for request_id, token in sampled.items()]
        self.finetune_runs.after_iteration()
        return outputs, self._iteration_stats(plan, shape, elapsed, observed)

    def _schedule(self, started: float) -> IterationPlan:
        """The plan: inference chunks, the finetuning tokens and backward the co-serving
        policy grants beside them, at the clock the governor chose."""
        clock_mhz = self.power_accounting.before_iteration(self._load_state) if self.power_accounting else None
        decoding = {s.request_id: s.tpot_slo_s for s in self.scheduler.decoding()}
        self.policy.begin_iteration(started, decoding, clock_mhz)
        self.finetune.before_schedule()
        plan = self.scheduler.schedule(
            lambda plan, left: self.policy.finetune_tokens(plan, left, self.finetune.expected_backward())
        )
        plan.backward = self.policy.backward_allowance(plan, self.scheduler.has_work(), self.finetune.backward_costs)
        now = time.time()
        for chunk in plan.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
        return plan

    def _execute(self, plan: IterationPlan) -> tuple[dict[str, int], dict]:
        """Runs the plan (forward, then the finetuning backward) and moves the sequences
        on; the sampled token and, where asked, its logprobs per request."""
        sampled: dict[str, int] = {}
        logprobs: dict[str, object] = {}
        if not plan.is_empty:
            result = self.runner.execute(plan)
            self.finetune.after_forward(plan, result.captured)
            for request_id, entries in result.prompt_logprobs.items():
                self.sequences[request_id].prompt_logprobs.extend(entries)
            self.scheduler.update(plan, result.sampled)
            sampled, logprobs = result.sampled, result.logprobs
        self.finetune.run_backward(plan.backward)
        return sampled, logprobs

    def _iteration_stats(
        self, plan: IterationPlan, shape: IterationShape, elapsed: float, observed: dict
    ) -> IterationStats:
        return msgspec.structs.replace(
            self.stats(elapsed, plan.num_tokens),
            finetune_forward_tokens=shape.finetune_forward_tokens,
            finetune_backward_layer_tokens=shape.finetune_backward_layer_tokens,
            finetune_loss_tokens=shape.finetune_loss_tokens,
            finetune_backward_tokens=shape.finetune_backward_layer_tokens / self.model.config.num_hidden_layers,
            decode_tokens=shape.decode_tokens,
            prefill_tokens=shape.prefill_tokens,
            budget_seconds=self.policy.tpot_budget_s(plan) if plan.chunks else None,
            **observed,
        )

    def _output(self, request_id: str, token: int, logprobs: dict) -> RequestOutput:
        seq = self.sequences[request_id]
        prompt_logprobs = queued = cached = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        if seq.num_output_tokens == 1:
            queued = max(0.0, seq.first_scheduled_time - seq.arrival_time)
            cached = seq.num_cached_tokens
        output = RequestOutput(
            request_id=request_id,
            new_token_ids=[token],
            logprobs=[logprobs[request_id]] if request_id in logprobs else None,
            prompt_logprobs=prompt_logprobs,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
            queued_seconds=queued,
            cached_tokens=cached,
            energy_joules=seq.energy_joules if self.power is not None else None,
        )
        if seq.is_finished:
            self._forget(seq)
        return output

    def _load_state(self) -> LoadState:
        """What the governor needs for the next control interval (see load_projection)."""
        # Preempted sequences that already answered count as running: their TTFT is past.
        admitted = self.scheduler.running + self.scheduler.waiting
        running = [s for s in admitted if s.num_output_tokens > 0]
        waiting = [s for s in admitted if s.num_output_tokens == 0]
        # The strictest SLOs of the requests the interval serves (TTFT only matters to
        # those still waiting for their first token).
        tpot_s = min((s.tpot_slo_s for s in admitted), default=self.config.tpot_slo_ms / 1000)
        ttft_s = min((s.ttft_slo_s for s in waiting), default=self.config.ttft_slo_ms / 1000)
        load = project_load(
            time.time(),
            running_context_lens=[s.num_tokens for s in running],
            waiting=sorted(((s.num_uncomputed_tokens, s.arrival_time) for s in waiting), key=lambda w: w[1]),
            arrivals=self.arrivals,
            interval_s=self.power.governor.interval_s,
            tpot_slo_s=tpot_s,
            finetune_tokens=self.power_accounting.finetune_forward_tokens,
        )
        return dataclasses.replace(load, ttft_slo_ms=ttft_s * 1000, tpot_slo_ms=tpot_s * 1000)

    def stats(self, iteration_seconds: float = 0.0, num_batched_tokens: int = 0) -> IterationStats:
        waiting = self.scheduler.waiting
        cache = self.block_manager.counters
        return IterationStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            iteration_seconds=iteration_seconds,
            num_batched_tokens=num_batched_tokens,
            lora_running=dict(Counter(s.lora.name for s in self.scheduler.running if s.lora is not None)),
            lora_waiting=dict(Counter(s.lora.name for s in waiting if s.lora is not None)),
            num_waiting_for_lora_slot=sum(1 for s in waiting if s.lora is not None and s.lora.slot is None),
            max_loras=self.config.max_loras,
            prefix_cache_queries=cache.queries,
            prefix_cache_hits=cache.hits,
            prefix_cache_evictions=cache.evictions,
            kv_pins=cache.pins,
            kv_pins_refused=cache.pins_refused,
            kv_pin_expiries=cache.pin_expiries,
            kv_pinned_blocks=self.block_manager.num_pinned_blocks,
        )
