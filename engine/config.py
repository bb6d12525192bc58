"""Engine configuration: plain dataclasses, validated once at construction.

The HTTP edge (server/settings.py) owns user-facing settings and their docs; it
builds one `EngineConfig` from them and hands it to the engine process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.power.governor import MODES as POWER_MODES
from engine.power.monitor import DEVICES as POWER_DEVICES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(name: str) -> None:
    if name != "auto" and name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")


def explicit_dtype(name: str, device: str) -> torch.dtype | None:
    """The compute type `name` stands for; None where the CPU probe decides (`auto` on a CPU,
    engine/model/gemm_probe.py)."""
    check_dtype(name)
    if name != "auto":
        return _DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


DECODE_WEIGHTS = ("auto", "float32", "bfloat16")


def _check_decode_weights(name: str) -> None:
    if name not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}; got {name!r}")


def resolve_panel_rows(decode_weights: str, dtype: str, device: str, probed_rows: int) -> int:
    """Up to how many rows a linear reads bfloat16 panels with float32 arithmetic (0 = never).

    `auto` takes what the CPU probe measured (`probed_rows`) when `dtype` is `auto` too;
    an explicit dtype keeps every matmul in that type (the tests that compare with
    transformers rely on that). `bfloat16` forces panels up to 16 rows, `float32` turns
    them off. A finetuning chunk in a batch within the panels' rows is forwarded with
    them too; its backward recomputes from the saved layer inputs with the plain weights
    (the two differ by the weights' rounding to bfloat16).
    """
    _check_decode_weights(decode_weights)
    if decode_weights == "float32" or device != "cpu":
        return 0
    if decode_weights == "auto":
        return probed_rows if dtype == "auto" else 0
    from engine import ops

    if not ops.bf16_linear_available():
        raise ValueError("decode_weights bfloat16 needs the CPU kernels on a CPU with AVX-512 or AVX2 and FMA")
    return ops.BF16_LINEAR_MAX_ROWS


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_kv_cache_dtype(name: str, dtype_setting: str, dtype: torch.dtype, device: str, kernels: bool,
                           bfloat16_pays: Callable[[], bool]) -> torch.dtype:
    """The KV cache's type, for a model computing in `dtype`.

    `auto`: the model's, except a float32 model on the CPU kernels under `dtype: auto`
    (which already reads its decode weights as bfloat16 panels): there the cache is
    bfloat16 where its decode attention measures no slower (`bfloat16_pays`): half the
    bytes each decode step reads, twice the tokens the same memory holds. An explicit
    type other than the model's exists only as bfloat16 under float32 on the CPU kernels
    (the tests that compare with transformers keep float32 throughout).
    """
    mixed_ok = device == "cpu" and kernels and dtype == torch.float32
    if name == "auto":
        return torch.bfloat16 if mixed_ok and dtype_setting == "auto" and bfloat16_pays() else dtype
    wanted = _DTYPES[name]
    if wanted != dtype and not (mixed_ok and wanted == torch.bfloat16):
        raise ValueError(f"kv_cache_dtype {name} under a {dtype_name(dtype)} model is not supported here: the KV "
                         "cache takes the model's type, or bfloat16 under float32 on the CPU kernels")
    return wanted


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    # Where measured, machine-specific choices are kept (the CPU GEMM probe); None =
    # measure at every start.
    cache_dir: Path | None = None
    dtype: str = "auto"
    # Weights read by batches of up to 16 rows on the CPU: auto, float32 or bfloat16
    # (see resolve_panel_rows).
    decode_weights: str = "auto"
    device: str = "cpu"
    # The KV cache's type: auto, float32 or bfloat16 (see resolve_kv_cache_dtype).
    kv_cache_dtype: str = "auto"
    # Tokens per KV-cache block.
    block_size: int = 16
    # Memory for the KV cache; the number of blocks follows from it.
    kv_cache_memory_gb: float = 2.0
    # Token budget of one iteration (decodes + prefill chunks).
    max_num_batched_tokens: int = 2048
    # Prefill tokens an iteration packs past the oldest prefill's chunk (engine/scheduler.py);
    # None = on a CPU with dtype auto, the chunk the GEMM probe measured at full rate,
    # else the whole budget.
    prefill_pack_tokens: int | None = None
    # Sequences in one iteration.
    max_num_seqs: int = 128
    # Cap on prompt + output length; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Intra-op threads for the CPU; None = torch's default (one per core). Per rank.
    num_threads: int | None = None
    # Ranks the model is split over (engine/parallel/): one process each, this one rank 0.
    tensor_parallel_size: int = 1
    # LoRA adapters loaded at start, as (name, path).
    lora_modules: tuple[tuple[str, str], ...] = ()
    # Adapters resident for compute at once; more wait in a host LRU of max_cpu_loras.
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
    # Reuse the KV blocks of prompt prefixes other requests computed (engine/block_manager.py).
    enable_prefix_caching: bool = True
    # Finished requests' KV kept on request (`kv_ttl`): at most this fraction of the cache
    # pinned at once, for at most max_kv_ttl_s seconds each.
    max_pinned_kv_fraction: float = 0.25
    max_kv_ttl_s: float = 600.0
    # Latency SLOs; finetuning only takes what keeps a predicted iteration within TPOT.
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 200.0
    # Backward slices of finetuning: at most this many layers recomputed per iteration,
    # all jobs together (next to inference, the latency model sizes the slice below it).
    finetune_backward_layers_per_iteration: int = 8
    # Accelerator watched for clocks, power and energy: auto = NVML on a CUDA device,
    # none on the CPU; simulated = engine/power/simulated_device.py (tests, what-ifs).
    power_device: str = "auto"
    # Frequency governor: off, advise (export the target clock) or apply (lock it).
    power_mode: str = "advise"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be positive")
        if self.tensor_parallel_size <= 0:
            raise ValueError("tensor_parallel_size must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.prefill_pack_tokens is not None and self.prefill_pack_tokens <= 0:
            raise ValueError("prefill_pack_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if not 1 <= self.max_loras <= self.max_cpu_loras:
            raise ValueError("need 1 <= max_loras <= max_cpu_loras")
        if self.max_lora_rank <= 0:
            raise ValueError("max_lora_rank must be positive")
        if not 0 <= self.max_pinned_kv_fraction <= 1:
            raise ValueError("max_pinned_kv_fraction must be between 0 and 1")
        if self.max_kv_ttl_s < 0:
            raise ValueError("max_kv_ttl_s must not be negative")
        if self.ttft_slo_ms <= 0 or self.tpot_slo_ms <= 0:
            raise ValueError("SLOs must be positive")
        if self.finetune_backward_layers_per_iteration <= 0:
            raise ValueError("finetune_backward_layers_per_iteration must be positive")
        if self.power_device not in POWER_DEVICES:
            raise ValueError(f"power_device must be one of {', '.join(POWER_DEVICES)}; got {self.power_device!r}")
        if self.power_mode not in POWER_MODES:
            raise ValueError(f"power_mode must be one of {', '.join(POWER_MODES)}; got {self.power_mode!r}")
        check_dtype(self.dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        _check_decode_weights(self.decode_weights)  # resolved (and the kernels built) by the engine
