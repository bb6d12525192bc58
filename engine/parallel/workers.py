"""The other ranks of a tensor-parallel engine: processes that run what rank 0 plans.

Rank 0 is the engine process (LLMEngine): it schedules, samples, and talks to the
server. With `tensor_parallel_size` N it starts ranks 1..N-1 (`TensorParallelRanks`),
and all N join one torch.distributed group (gloo on the CPU, NCCL on CUDA) by env://
rendezvous, MASTER_ADDR / MASTER_PORT set as torchrun sets them. Each rank loads its
shard of the model (engine/parallel/tensor_parallel.py) and a KV cache of the same
number of blocks for its own KV heads, so rank 0's block tables are valid on all.

Every iteration rank 0 broadcasts one message, (adapter slot loads since the last one,
ForwardBatch), and every rank runs the batch (ModelRunner.run): the collectives inside
the model (all-reduces, the LM head's all-gather) pair up because all ranks make the
same calls in the same order. A slot load names the adapter's directory; each rank
reads it and keeps its own shard. A None message stops the ranks; each also dies with
rank 0 (PDEATHSIG), so none is left waiting on a collective.
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
from engine.lora.backend import NativeLoRABackend
from engine.lora.manager import LoRAManager
from engine.lora.slots import LoRASlots
from engine.model.loader import load_model
from engine.parallel.tensor_parallel import TensorParallel, read_lora_shard, shard_layout

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
SlotLoads = list[tuple[int, str]]


def threads_per_rank(config: EngineConfig) -> int:
    """Intra-op threads of each rank: the setting, else the cores shared out (N ranks of
    one thread per core each would oversubscribe the CPU N times)."""
    return config.num_threads or max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, size: int, device: str) -> TensorParallel:
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=size)
    return TensorParallel(rank, size)


class TensorParallelRanks:
    """Rank 0's handle on ranks 1..N-1: starts them, joins the group, feeds them batches."""

    def __init__(self, config: EngineConfig, dtype: torch.dtype, panel_rows: int, packed_rows: int):
        size = config.tensor_parallel_size
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_rank_main, args=(rank, config, dtype, panel_rows, packed_rows),
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
        dist.broadcast_object_list([(loads, batch)], src=0)

    def close(self) -> None:
        dist.broadcast_object_list([None], src=0)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def _rank_main(rank: int, config: EngineConfig, dtype: torch.dtype, panel_rows: int, packed_rows: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engine.llm_engine import kv_cache_blocks, model_len_limit
    from engine.runner import ModelRunner

    torch.set_num_threads(threads_per_rank(config))
    tp = _join_group(rank, config.tensor_parallel_size, config.device)
    model = load_model(config.model_dir, dtype, config.device, panel_rows, packed_rows, tensor_parallel=tp)
    num_blocks = kv_cache_blocks(config, model, dtype)
    layout = model.lora_layout()
    slots = LoRASlots(shard_layout(layout, tp.size), config.max_loras, config.max_lora_rank, dtype, config.device)
    runner = ModelRunner(model, num_blocks, config.block_size, model_len_limit(config, model.config, num_blocks),
                         config.device, lora_backend=NativeLoRABackend(slots))
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        loads, batch = message[0]
        for slot, path in loads:
            slots.write(slot, read_lora_shard(Path(path), layout, config.max_lora_rank, dtype, tp))
        runner.run(batch)
    dist.destroy_process_group()
