"""Linear layers with weights pre-packed for the CPU: MKL's GEMM (float32), oneDNN's
(float32 or bfloat16), bfloat16 panels.

Packing a weight once into MKL's internal panel layout saves the re-layout that
every plain `F.linear` call does: on the 2-core Xeon (quiet, 2026-11-21) the
matmuls of one SmolLM2-135M decode step at 32 rows (30 layers + LM head, each op
timed alone) took 39 ms packed against 65 ms plain on two threads, 73 against
102 ms on one. The packed GEMM
computes the same products as `F.linear` (the native path, kept as the reference);
results match to float32 rounding for any number of rows.

torch's `_mkl_linear` takes the packed path only when the call's row-count argument
equals the input's rows, and otherwise runs a plain GEMM on the unpacked weight. The
packed buffer itself does not depend on that count (MKL packs the weight panels
alone), so each call passes its own row count. Above about 64 rows the packed path
stops paying (5-15% slower than plain at 128-512 rows, where the GEMM is bound by
compute), so larger calls (prefill chunks, training chunks) run plain. Measured with
`python bench/packed_rows.py` (every linear of a decode step, LM head included) on the
same machine: 4 to 24 rows 33-48 ms packed against 49-70 ms plain.

With `panel_max_rows` set, each layer also keeps its weight as bfloat16 panels, and
calls of up to that many rows run csrc/cpu/bf16_linear.cpp on them: the weights
streamed once per call at half the bytes of float32, float32 arithmetic. How many
rows that pays for is measured per CPU (engine/model/gemm_probe.py): a few rows on the
Xeon with AMX; on the AMD EPYC with AVX2, where the panel kernel runs near the FMA peak,
it beat oneDNN's float32 GEMM from 1 to 64 rows and tied at 128. It applies to a
bfloat16 model too, whose GEMM is no faster than the panels at a few rows.

A weight is packed for oneDNN too, once, into the blocked layout its kernels read
(AMX tiles for bfloat16, where the CPU has them): `F.linear` re-lays the weight out on
every call. On the 2-core Xeon with AMX (2026-12-06) 30 layers' bfloat16 linears of
SmolLM2-135M took, in ms at 1/8/32/64/128 rows, 20.1/19.7/21.9/29.5/45.1 plain against
13.0/13.0/16.4/17.9/27.3 packed, at 256 rows 62.1 against 50.6; from 384 rows up the
plain call was faster (1024 rows: 206 against 226). On a 2-core AMD EPYC with AVX2 only
(2026-12-07), where the model runs float32, its 30 layers' linears and LM head took
34.1/85.5/125.8/179.8/319.7 ms at 1/8/32/64/128 rows MKL-packed, 41.5/73.0/114.5/174.9/285.1
plain and 26.9/45.5/78.6/138.5/252.3 packed for oneDNN, at 256 rows 554 plain against 486;
at 512 plain won (888 against 948). Which calls run on oneDNN-packed weights is measured per CPU
(engine/model/gemm_probe.py); a packed copy is made only for calls that the panels
(then oneDNN's copy) do not take. Outputs are those of `F.linear` to the type's
rounding.

oneDNN builds (JIT-compiles) and caches one primitive per distinct input shape, and a
packed-weight primitive holds about 0.6 MiB: with every row count from 2 to 256 seen
(a serving engine sees them all) that is ~470 MiB kept by its cache of 1,024
primitives, and once the cache evicts, rebuilt primitives fragment the heap until
resident memory grows without bound (`bench/engine_memory.py`; 2026-12-06, the soak
grew 1.5 GiB in 5 minutes). Calls on oneDNN (packed weights, and plain bfloat16 ones)
therefore run on row counts rounded up to a few buckets (`bucket_rows`), the extra rows
zeros, cut off the result: at most a few dozen shapes per weight, and the padded rows of
a call this small cost little. Plain float32 calls run MKL's GEMM, which caches nothing.

Used only where it applies: the CPU, float32 (MKL packing, with a torch built with
MKL), oneDNN packing where this build and CPU do it for the weight's type, or panels.
Everything else runs the layers as they are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops

# Row count handed to MKL's packing call; the packed layout is the same for any count.
_PACKING_ROWS = 32
# Largest call that takes MKL's packed path (see the module docstring).
MKL_PACKED_MAX_ROWS = 64
# oneDNN calls run on row counts rounded up to a multiple of these (see the module
# docstring): fine steps up to _SMALL_ROWS (decodes, where oneDNN's packed weights
# serve), coarser ones above (prefill and training chunks); below one step, to a power
# of two: one sequence decoding alone ran 20% slower padded to 8 rows (float32, the AMD
# EPYC of the docstring: a decode step of 50.8 ms against 42.5 on MKL-packed weights).
_SMALL_ROWS = 256
_SMALL_ROW_STEP = 8
_LARGE_ROW_STEP = 32
# Row count handed to oneDNN's packing call (its hint for the kernel to prepare): the
# packed weight serves any row count; timed alike for hints 16-128.
_ONEDNN_PACKING_ROWS = 64


def mkl_packing_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def mkl_pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [out, in] weight in MKL's packed layout, for mkl_linear."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, _PACKING_ROWS)


def mkl_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] through the packed weight: its row count goes with the call (see the
    module docstring); `weight` is the plain one, whose shape MKL reads."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])


def onednn_packing_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and _onednn_packs(weight.dtype)
    )


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build and this CPU pack weights of `dtype`: the op is absent in
    some builds, and oneDNN refuses bfloat16 on CPUs without AVX512-BW/VL/DQ or
    AVX-NE-CONVERT (a 2-core AMD EPYC with AVX2 only, 2026-12-07, raised at start-up
    before this was tried here)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), _ONEDNN_PACKING_ROWS)
    except (AttributeError, RuntimeError):
        return False
    return True


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 or bfloat16 [out, in] weight in oneDNN's layout, for onednn_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_PACKING_ROWS)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def bucket_rows(rows: int, onednn_max_rows: int) -> int:
    """The row count a oneDNN call of `rows` runs on (see the module docstring)."""
    if rows < _SMALL_ROW_STEP:
        padded = 1 << (rows - 1).bit_length()
    else:
        step = _SMALL_ROW_STEP if rows <= _SMALL_ROWS else _LARGE_ROW_STEP
        padded = -(-rows // step) * step
    # A call on the packed path stays there.
    return min(padded, onednn_max_rows) if rows <= onednn_max_rows else padded


def on_bucketed_rows(linear, x: torch.Tensor, rows: int, padded_rows: int) -> torch.Tensor:
    """linear(x) computed on x's rows padded with zeros to `padded_rows`.
    x: [..., in] with `rows` rows in all -> [..., out]."""
    flat = x.reshape(rows, x.shape[-1])
    if padded_rows != rows:
        flat = F.pad(flat, (0, 0, 0, padded_rows - rows))
    y = linear(flat)[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear_on_row_buckets(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, on bucketed row counts where the weight is bfloat16 (oneDNN's GEMM);
    differentiable, so a backward's GEMMs see the same few shapes."""
    rows = x.numel() // x.shape[-1]
    if weight.dtype != torch.bfloat16 or rows == 0:
        return F.linear(x, weight, bias)
    return on_bucketed_rows(lambda flat: F.linear(flat, weight, bias), x, rows, bucket_rows(rows, 0))


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed once. x: [rows, in] -> [rows, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, panel_max_rows: int = 0,
                 onednn_max_rows: int = 0):
        super().__init__()
        # The plain weight stays: MKL reads its shape, and the native path, the
        # finetuning recompute and adapters (LoRA) use it.
        self.weight = weight
        self.bias = bias
        self.panel_max_rows = min(panel_max_rows, ops.bf16_linear_max_rows())
        self.bf16_panels = self.panel_bias = None
        if self.panel_max_rows:
            self.bf16_panels = ops.pack_bf16_weight(weight)  # [ceil(out / 16), in, 16]
            self.panel_bias = None if bias is None else bias.float()
        # The packed copies only where they would serve calls that the panels (then
        # oneDNN's copy) do not.
        self.onednn = None
        if onednn_max_rows > self.panel_max_rows and onednn_packing_available(weight):
            self.onednn = onednn_pack(weight)
        self.onednn_max_rows = onednn_max_rows if self.onednn is not None else 0
        self.packed = None
        if mkl_packing_available(weight) and max(self.panel_max_rows, self.onednn_max_rows) < MKL_PACKED_MAX_ROWS:
            self.packed = mkl_pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.requires_grad:  # a finetuning recompute: the packed kernels have no gradients
            return linear_on_row_buckets(x, self.weight, self.bias)
        if 0 < rows <= self.panel_max_rows and x.dim() == 2:
            y = ops.bf16_linear(x.float(), self.bf16_panels, self.weight.shape[0], self.panel_bias)
            return y.to(x.dtype)
        if 0 < rows <= self.onednn_max_rows:
            return on_bucketed_rows(lambda flat: onednn_linear(flat, self.onednn, self.bias), x, rows,
                                    bucket_rows(rows, self.onednn_max_rows))
        if self.weight.dtype == torch.bfloat16:
            return linear_on_row_buckets(x, self.weight, self.bias)
        if self.packed is None or rows > MKL_PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        return mkl_linear(x, self.packed, self.weight, self.bias)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module, panel_max_rows: int = 0, onednn_max_rows: int = 0) -> None:
    """Replace every nn.Linear in `model` by a PackedLinear, where packing applies:
    float32 weights (MKL), panels for calls of up to `panel_max_rows` rows, weights
    packed for oneDNN for calls of up to `onednn_max_rows`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            weight = child.weight if isinstance(child, nn.Linear) else None
            if weight is None:
                continue
            if (mkl_packing_available(weight) or (panel_max_rows and weight.device.type == "cpu")
                    or (onednn_max_rows and onednn_packing_available(weight))):
                setattr(module, child_name, PackedLinear(weight, child.bias, panel_max_rows, onednn_max_rows))
