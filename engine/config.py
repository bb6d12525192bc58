"""Engine configuration: plain dataclasses, validated once at construction.

The HTTP edge (server/settings.py) owns user-facing settings and their docs; it
builds one `EngineConfig` from them and hands it to the engine process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.power.governor import MODES as POWER_MODES
from engine.power.monitor import DEVICES as POWER_DEVICES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_computes_bf16_natively() -> bool:
    """True when the CPU has AMX-BF16 tiles, where oneDNN's bf16 GEMMs beat fp32.

    AVX512-BF16 alone is not enough: on such a CPU (Xeon, 2 cores, torch 2.13,
    quiet machine) a [32, 576] x [576, 3072] linear took 0.93 ms in bf16 against
    0.60 ms in fp32, and SmolLM2-135M ran offline at 184 tok/s in bf16 against
    228 in fp32, so float32 is the faster correct choice there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` picks the fastest type the device computes natively and correctly."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
        return _DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_computes_bf16_natively() else torch.float32


DECODE_WEIGHTS = ("auto", "float32", "bfloat16")


def _check_decode_weights(name: str) -> None:
    if name not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}; got {name!r}")


def resolve_decode_weights(name: str, dtype: str, device: str) -> bool:
    """Whether decode-sized batches read bfloat16 copies of float32 weights.

    `auto` turns them on where the CPU kernel runs (AVX-512) and `dtype` is `auto` and
    resolved to float32: a decode step of a few sequences is bound by reading weights,
    and bfloat16 halves those bytes while the arithmetic stays float32. An explicit
    `dtype: float32` keeps every matmul in float32 (the tests that compare with
    transformers rely on that). A finetuning chunk in a batch of at most 16 rows is
    forwarded with the bfloat16 weights too; its backward recomputes in float32 from
    the saved layer inputs.
    """
    _check_decode_weights(name)
    if name == "float32" or device != "cpu" or resolve_dtype(dtype, device) != torch.float32:
        return False
    if name == "auto" and dtype != "auto":
        return False
    from engine import ops

    if not ops.bf16_linear_available():
        if name == "bfloat16":
            raise ValueError("decode_weights bfloat16 needs the CPU kernels on a CPU with AVX-512")
        return False
    return True


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    dtype: str = "auto"
    # Weights read by batches of up to 16 rows on the CPU: auto, float32 or bfloat16
    # (see resolve_decode_weights).
    decode_weights: str = "auto"
    device: str = "cpu"
    # Tokens per KV-cache block.
    block_size: int = 16
    # Memory for the KV cache; the number of blocks follows from it.
    kv_cache_memory_gb: float = 2.0
    # Token budget of one iteration (decodes + prefill chunks).
    max_num_batched_tokens: int = 2048
    # Sequences in one iteration.
    max_num_seqs: int = 64
    # Cap on prompt + output length; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Intra-op threads for the CPU; None = torch's default (one per core).
    num_threads: int | None = None
    # LoRA adapters loaded at start, as (name, path).
    lora_modules: tuple[tuple[str, str], ...] = ()
    # Adapters resident for compute at once; more wait in a host LRU of max_cpu_loras.
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
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
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if not 1 <= self.max_loras <= self.max_cpu_loras:
            raise ValueError("need 1 <= max_loras <= max_cpu_loras")
        if self.max_lora_rank <= 0:
            raise ValueError("max_lora_rank must be positive")
        if self.ttft_slo_ms <= 0 or self.tpot_slo_ms <= 0:
            raise ValueError("SLOs must be positive")
        if self.finetune_backward_layers_per_iteration <= 0:
            raise ValueError("finetune_backward_layers_per_iteration must be positive")
        if self.power_device not in POWER_DEVICES:
            raise ValueError(f"power_device must be one of {', '.join(POWER_DEVICES)}; got {self.power_device!r}")
        if self.power_mode not in POWER_MODES:
            raise ValueError(f"power_mode must be one of {', '.join(POWER_MODES)}; got {self.power_mode!r}")
        resolve_dtype(self.dtype, self.device)  # fails early on a bad name
        _check_decode_weights(self.decode_weights)  # resolved (and the kernels built) by the engine
