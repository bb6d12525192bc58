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
# The types the CPU kernels compute in; a model of another (float16) runs natively.
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def cpu_signature() -> str:
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
    sources = [
        CSRC / "cpu" / name
        for name in ("paged_attention.cpp", "prefill_attention.cpp", "bf16_linear.cpp", "add_rms_norm.cpp",
                     "rope_write_kv.cpp", "silu_and_mul.cpp")
    ]
    if not all(source.is_file() for source in sources):
        log.info("csrc/ not found: native CPU attention and float32 weights")
        return False
    try:
        from torch.utils.cpp_extension import load

        # torch rebuilds when a source or a flag changes, but does not read headers: their
        # digest goes into the flags so that a changed header rebuilds too.
        headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted((CSRC / "cpu").glob("*.h"))))
        load(
            name=f"coserve_cpu_ops_{cpu_signature()}",
            sources=[str(source) for source in sources],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math",
                          f"-DCOSERVE_CPU_HEADERS={headers.hexdigest()[:12]}"],
            is_python_module=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the native path
        log.warning("CPU kernels unavailable (%s): native CPU attention and float32 weights", exc)
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


@functools.cache
def prefill_attention_available() -> bool:
    """The CPU kernels built with AMX, and the OS granted this process the AMX state."""
    return cpu_kernels_available() and torch.ops.coserve.prefill_attention_supported()


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start: int,
    scale: float,
) -> None:
    """Causal attention of one prefill chunk over its sequence's cache (AMX, bfloat16).

    Semantics: out[i, h] = softmax(scale * q[i, h] . K^T) V over keys 0 .. start + i,
    where K, V are the sequence's cached tokens (the chunk's own included: they are
    written first), token t at slot t % block_size of block block_table[t // block_size];
    query head h reads kv head h // (heads / kv_heads).

    Shape (all bfloat16 but the table):
        out, q: [tokens, heads, head_dim], each token's heads contiguous (q may be a
        view into the qkv projection); head_dim a multiple of 32
        k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
        block_table: [>= ceil((start + tokens) / block_size)] int64
    """
    torch.ops.coserve.prefill_attention(out, q, k_cache, v_cache, block_table, start, scale)


# Weights packed for `bf16_linear` hold this many outputs per panel.
BF16_PANEL = 16
# Rows that `bf16_linear` takes on every build that has it: decode-sized batches, where
# reading the weights dominates. Some builds take more (bf16_linear_max_rows).
BF16_LINEAR_MAX_ROWS = 16


def bf16_linear_available() -> bool:
    """The CPU kernels built, for a CPU with AVX-512 or AVX2 and FMA (the kernel's instructions)."""
    return cpu_kernels_available() and torch.ops.coserve.bf16_linear_supported()


@functools.cache
def bf16_linear_max_rows() -> int:
    """The most rows a `bf16_linear` call may have in this build: 16 with AVX-512, 128
    with AVX2 (see csrc/cpu/bf16_linear.cpp); 0 without the kernel."""
    return int(torch.ops.coserve.bf16_linear_max_rows()) if bf16_linear_available() else 0


def pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float weight -> [ceil(N / 16), K, 16] bfloat16 panels for `bf16_linear`
    (outputs past N are zero)."""
    n, k = weight.shape
    panels = -(-n // BF16_PANEL)
    padded = torch.nn.functional.pad(weight, (0, 0, 0, panels * BF16_PANEL - n))  # [panels * 16, K]
    return padded.to(torch.bfloat16).view(panels, BF16_PANEL, k).transpose(1, 2).contiguous()


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W read from its bfloat16 panels, all arithmetic in float32.

    Semantics: F.linear(x, W.to(bfloat16).float(), b), up to float32 summation order.

    Shape:
        x: [rows, K] float32, 1 <= rows <= bf16_linear_max_rows()
        packed: [ceil(out_features / 16), K, 16] bfloat16 (pack_bf16_weight)
        bias: [out_features] float32 or None; returns [rows, out_features] float32
    """
    out = x.new_empty(x.shape[0], out_features)
    torch.ops.coserve.bf16_linear(out, x.contiguous(), packed, bias)
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, when given), then returns RMSNorm(x) * weight, in one pass.

    Semantics: x = x + delta; weight * F.rms_norm(x, (hidden,), eps=eps).to(weight.dtype),
    up to float32 summation order.

    Shape:
        x: [rows, hidden] float32, contiguous (the residual stream)
        delta: [rows, hidden] (made contiguous), weight: [hidden], both float32 or both
        bfloat16; returns [rows, hidden] in the weight's type
    """
    out = torch.empty(x.shape, dtype=weight.dtype)
    torch.ops.coserve.add_rms_norm(out, x, None if delta is None else delta.contiguous(), weight, eps)
    return out


def rope_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Rotates q and k in place in `qkv` and writes k and v to their cache slots.

    Semantics: q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin) (engine/model/rope.py),
    then attention.write_kv(k_cache, v_cache, k, v, slots).

    Shape (tensors all float32 or all bfloat16, rotated in float32):
        qkv: [tokens, (num_heads + 2 num_kv_heads) * head_dim], contiguous
        cos, sin: [tokens, head_dim]; slots: [tokens] int64
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    """
    torch.ops.coserve.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation in one pass.

    Semantics: gate, up = x.chunk(2, dim=-1); F.silu(gate) * up, computed in float32 and
    rounded once to x's type.

    Shape:
        x: [rows, 2 * intermediate] float32 or bfloat16, contiguous; returns [rows, intermediate]
    """
    out = x.new_empty(x.shape[0], x.shape[1] // 2)
    torch.ops.coserve.silu_and_mul(out, x)
    return out
