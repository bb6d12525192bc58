"""The other ranks of a tensor-parallel engine: processes that run what rank 0 plans.

Rank 0 is the engine process (LLMEngine): it schedules, samples, and talks to the
server. With `tensor_parallel_size` N it starts ranks 1..N-1 (`TensorParallelRanks`),
and all N join one torch.distributed group (gloo on the CPU, NCCL on CUDA) by env://
rendezvous, MASTER_ADDR / MASTER_PORT set as torchrun sets them. Each rank loads its
shard of the model (engine/parallel/tensor_parallel.py) and a KV cache of the same
number of blocks for its own KV heads, so rank 0's block tables are valid on all.

Rank 0 broadcasts every piece of work before it does it, and the ranks do the same:
  ("forward", slot loads, ForwardBatch)   every iteration: the adapter slots rank 0
      wrote since the last one (each rank writes its own share: of the adapter in a
      directory, or of a finetuning job's current weights), then the batch
      (ModelRunner.run); the ranks keep the finetuning chunks' layer inputs;
  ("job", (job id, operation, arguments)) each operation on a finetuning job's tensors
      (engine/finetune/job_shard.py), "create" and "release" included.
The collectives inside (the model's all-reduces, the LM head's all-gather, a job's
gradient sums and gathers) pair up because all ranks make the same calls in the same
order. A None message stops the ranks; each also dies with rank 0 (PDEATHSIG), so none
is left waiting on a collective.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.forward_batch import ForwardBatch
from engine.finetune.job_shard import JobShard
from engine.lora.backend import NativeLoRABackend
from engine.lora.manager import LoRAManager, SlotLoad
from engine.lora.slots import LoRASlots
from engine.model.loader import load_model
from engine.parallel.tensor_parallel import TensorParallel, read_lora_shard, shard_layout

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def threads_per_rank(config: EngineConfig) -> int:
    """Intra-op threads of each rank: the setting, else the cores shared out (N ranks of
    one thread per core each would oversubscribe the CPU N times)."""
    return config.num_threads or max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def rank_device(device: str, rank: int) -> str:
    """The device of `rank`: the CPU for all, or on CUDA one GPU each, counted from the
    engine's (rank 0's) GPU."""
    if not device.startswith("cuda"):
        return device
    _, _, index = device.partition(":")
    return f"cuda:{int(index or 0) + rank}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, size: int, device: str) -> TensorParallel:
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=size)
    return TensorParallel(rank, size)


class TensorParallelRanks:
    """Rank 0's handle on ranks 1..N-1: starts them, joins the group, feeds them batches."""

    def __init__(self, config: EngineConfig, dtype: torch.dtype, kv_dtype: torch.dtype, panel_rows: int,
                 packed_rows: int):
        size = config.tensor_parallel_size
        if config.device.startswith("cuda"):
            last = rank_device(config.device, size - 1)
            if int(last.partition(":")[2]) >= torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size {size} needs one GPU per rank, {config.device} to {last}; "
                                 f"this machine has {torch.cuda.device_count()}")
            torch.cuda.set_device(rank_device(config.device, 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_rank_main, args=(rank, config, dtype, kv_dtype, panel_rows, packed_rows),
                            name=f"coserve-rank{rank}")
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        self.tp = _join_group(0, size, config.device)
        self.loras: LoRAManager | None = None

    def send(self, batch: ForwardBatch) -> None:
        """Before rank 0 runs `batch`: every rank gets it, with the adapter slots rank 0
        loaded since the last batch."""
        loads = self.loras.take_slot_loads() if self.loras is not None else []
        dist.broadcast_object_list([("forward", loads, batch)], src=0)

    def send_job_operation(self, operation: tuple) -> None:
        """Before rank 0 runs an operation on a job's tensors: every rank runs it too."""
        dist.broadcast_object_list([("job", operation)], src=0)

    def close(self) -> None:
        dist.broadcast_object_list([None], src=0)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def _rank_main(rank: int, config: EngineConfig, dtype: torch.dtype, kv_dtype: torch.dtype, panel_rows: int,
               packed_rows: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.llm_engine import kv_cache_blocks, model_len_limit
    from engine.runner import ModelRunner

    torch.set_num_threads(threads_per_rank(config))
    device = rank_device(config.device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # NCCL's communicator for this rank lives on its GPU
    tp = _join_group(rank, config.tensor_parallel_size, device)
    model = load_model(config.model_dir, dtype, device, panel_rows, packed_rows, tensor_parallel=tp)
    num_blocks = kv_cache_blocks(config, model, kv_dtype)
    layout = model.lora_layout()
    slots = LoRASlots(shard_layout(layout, tp.size), config.max_loras, config.max_lora_rank, dtype, device)
    runner = ModelRunner(model, num_blocks, config.block_size, model_len_limit(config, model.config, num_blocks),
                         device, lora_backend=NativeLoRABackend(slots), kv_dtype=kv_dtype)
    jobs: dict[str, JobShard] = {}

    def slot_weights(load: SlotLoad):
        if load.job_id is not None:
            return jobs[load.job_id].lora.serving_weights(dtype)
        return read_lora_shard(Path(load.path), layout, config.max_lora_rank, dtype, tp)

    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        if message[0][0] == "job":
            _run_job_operation(jobs, model, tp, *message[0][1])
            continue
        _, loads, batch = message[0]
        for load in loads:
            slots.write(load.slot, slot_weights(load))
        _, _, per_layer = runner.run(batch)
        captured = batch.captured_by_sequence(per_layer)
        for job_id, seq_id in batch.finetune_owners:
            jobs[job_id].keep(seq_id, captured[seq_id])
    dist.destroy_process_group()


# Job operations with no collective inside: an error in one fails the job on rank 0 as
# well (it runs the same operation on the same inputs), which reports it, so this rank
# logs it and lives on. An error inside any other operation would leave the ranks'
# collectives out of step, so it ends this rank, and rank 0's next collective fails
# rather than waits.
_LOCAL_OPERATIONS = frozenset({"create", "release", "drop", "start_backward", "load_trainer_state"})


def _run_job_operation(jobs: dict[str, JobShard], model, tp: TensorParallel, job_id: str, operation: str,
                       args: tuple) -> None:
    """One operation on a job's tensors, as rank 0 runs it."""
    try:
        if operation == "create":
            jobs[job_id] = JobShard(model, *args, tp)
        elif operation == "release":
            jobs.pop(job_id, None)
        else:
            getattr(jobs[job_id], operation)(*args)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        if operation not in _LOCAL_OPERATIONS:
            raise
        log.error("rank %d: finetuning job %s: %s failed: %s", tp.rank, job_id, operation, exc)
