"""Kernel-backed ops and the start-up choice between them and their native versions.

Kernels live in csrc/ and are registered with TORCH_LIBRARY under the `coserve`
namespace. The CPU ones are compiled on first use (torch's JIT extension builder,
cached under ~/.cache/torch_extensions), tuned to the CPU they run on. Where the
build is not possible (no compiler, no csrc/ in an installed wheel) the engine
logs why and runs the native PyTorch versions, which are also the references the
kernels are tested against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _cpu_signature() -> str:
    """A short hash of this CPU's model and instruction-set flags.

    The kernels are built with -march=native, and torch's extension cache keys a build
    by name and sources only: a build cached on one CPU (a Docker image built on a
    newer host, a shared home directory) would load on another and could die on an
    illegal instruction. Naming the build after the CPU makes another CPU build its own.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (once per machine) and load the CPU kernels; False if that is impossible."""
    source = CSRC / "cpu" / "paged_attention.cpp"
    if not source.is_file():
        log.info("csrc/ not found: native CPU attention")
        return False
    try:
        from torch.utils.cpp_extension import load

        load(
            name=f"coserve_cpu_ops_{_cpu_signature()}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            is_python_module=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the native path
        log.warning("CPU kernels unavailable (%s): native CPU attention", exc)
        return False
    return True


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    """Single-query attention of each sequence over its cached tokens, read in place.

    Semantics: out[s, h] = softmax(scale * q[s, h] . K_s^T) V_s, where K_s, V_s are
    the first context_lens[s] tokens of sequence s, token t at slot t % block_size of
    block block_tables[s, t // block_size]; query head h reads kv head
    h // (heads / kv_heads).

    Shape:
        out, q: [num_seqs, heads, head_dim] (q may be a strided view; out contiguous)
        k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
        block_tables: [num_seqs, max_blocks] int64; context_lens: [num_seqs] int64
    """
    torch.ops.coserve.paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale)
