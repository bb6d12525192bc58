"""The C++ CPU kernels against their native references: decode attention against the
gathered-SDPA path (also with float32 queries over a bfloat16 cache), the bfloat16-weight linear against F.linear on rounded weights, the
fused residual add and RMSNorm against F.rms_norm, the fused rotary embedding and cache
write against apply_rope and write_kv."""

from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.attention import AttentionMetadata, _gathered_decode_attention, write_kv
from engine.model.rope import apply_rope

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not ops.cpu_kernels_available(), reason="C++ CPU kernels did not build here"),
]


# (query type, cache type, tolerance): a float32 model may keep a bfloat16 cache.
@pytest.mark.parametrize("dtype, cache_dtype, atol", [
    (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, torch.bfloat16, 1e-5),
])
# With AVX-512: groups of 1, 3 and 2 (head_dim 128) take the register kernels, 8 the generic
# loop. With AVX2 only: head_dim 64 and 128 take its passes (any group). head_dim 32: the
# generic loop everywhere.
@pytest.mark.parametrize("heads, kv_heads, head_dim",
                         [(4, 4, 64), (9, 3, 64), (8, 1, 64), (4, 2, 128), (4, 2, 32)])
def test_decode_kernel_matches_native(dtype, cache_dtype, atol, heads, kv_heads, head_dim):
    torch.manual_seed(heads * 10 + kv_heads)
    num_blocks, block_size = 40, 8
    context_lens = torch.tensor([1, 8, 9, 37, 64])
    max_blocks = 8
    # Each sequence gets its own random, non-contiguous blocks; unused entries point at block 0.
    perm = torch.randperm(num_blocks)[: len(context_lens) * max_blocks].view(len(context_lens), max_blocks)
    used = torch.arange(max_blocks) < (-(-context_lens // block_size)).unsqueeze(1)
    tables = torch.where(used, perm, 0)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
    v_cache = torch.randn_like(k_cache)
    # q as a strided view, the way the model hands it over (a slice of the fused qkv).
    q = torch.randn(len(context_lens), heads + kv_heads, head_dim, dtype=dtype)[:, :heads]
    scale = head_dim**-0.5

    out = torch.empty(len(context_lens), heads, head_dim, dtype=dtype)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, context_lens, scale)

    mask = (torch.arange(max_blocks * block_size) < context_lens.unsqueeze(1)).view(len(context_lens), 1, 1, -1)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), len(context_lens), tables, context_lens, mask, [])
    # The reference reads the same cached values, widened to float32.
    reference = _gathered_decode_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    torch.testing.assert_close(out.float(), reference, atol=atol, rtol=0)
    if dtype != cache_dtype:  # the native path takes the mixed types too
        native = _gathered_decode_attention(q, k_cache, v_cache, meta, scale)
        torch.testing.assert_close(native, reference, atol=atol, rtol=0)


def test_kernel_checks_its_inputs():
    q = torch.randn(2, 4, 16)
    cache = torch.randn(4, 4, 2, 16)
    with pytest.raises(RuntimeError, match="block_tables must be contiguous int64"):
        ops.paged_decode_attention(torch.empty_like(q), q, cache, cache, torch.zeros(2, 1, dtype=torch.int32),
                                   torch.ones(2, dtype=torch.long), 0.25)
    with pytest.raises(RuntimeError, match="bfloat16 under float32 q"):  # no float32 cache under bfloat16 queries
        qb = q.bfloat16()
        ops.paged_decode_attention(torch.empty_like(qb), qb, cache, cache, torch.zeros(2, 1, dtype=torch.long),
                                   torch.ones(2, dtype=torch.long), 0.25)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        q3 = torch.randn(2, 3, 16)
        ops.paged_decode_attention(torch.empty_like(q3), q3, cache, cache, torch.zeros(2, 1, dtype=torch.long),
                                   torch.ones(2, dtype=torch.long), 0.25)


bf16_kernel = pytest.mark.skipif(not ops.bf16_linear_available(), reason="bf16_linear needs a CPU with AVX-512 or AVX2 (and FMA)")


@bf16_kernel
@pytest.mark.parametrize("out_features, in_features", [(40, 48), (576, 576), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 7, 12, 13, 16, 17, 37, 128])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_equals_linear_on_rounded_weights(out_features, in_features, rows, with_bias):
    if rows > ops.bf16_linear_max_rows():
        pytest.skip(f"this build's bf16_linear takes at most {ops.bf16_linear_max_rows()} rows")
    torch.manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(rows, in_features)
    packed = ops.pack_bf16_weight(weight)  # [ceil(out / 16), in, 16]
    assert packed.shape == (-(-out_features // 16), in_features, 16) and packed.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, weight.to(torch.bfloat16).float(), bias)
    torch.testing.assert_close(ops.bf16_linear(x, packed, out_features, bias), expected, atol=1e-5 * in_features**0.5,
                               rtol=1e-5)


@bf16_kernel
def test_bf16_linear_checks_its_inputs():
    packed = ops.pack_bf16_weight(torch.randn(32, 8))
    most = ops.bf16_linear_max_rows()
    assert most in (16, 128)  # AVX-512, AVX2
    with pytest.raises(RuntimeError, match=f"1 to {most} rows"):
        ops.bf16_linear(torch.randn(most + 1, 8), packed, 32, None)
    with pytest.raises(RuntimeError, match="K = 8, x has 9"):
        ops.bf16_linear(torch.randn(2, 9), packed, 32, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bf16_linear(torch.randn(2, 8), packed, 32, torch.randn(31))


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 300])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_the_native_norm(rows, with_delta, dtype):
    """The residual stays float32; delta, weight and the result are in the compute type."""
    torch.manual_seed(rows)
    hidden, eps = 576, 1e-5
    x = torch.randn(rows, hidden) * 3
    delta = torch.randn(rows, hidden).to(dtype) if with_delta else None
    weight = torch.randn(hidden).to(dtype)
    expected_sum = x + delta if with_delta else x.clone()
    # The native RMSNorm: normalised in float32, rounded to the compute type, then weighted.
    expected = weight * torch.nn.functional.rms_norm(expected_sum, (hidden,), eps=eps).to(dtype)

    normed = ops.add_rms_norm(x, delta, weight, eps)

    assert normed.dtype == dtype
    torch.testing.assert_close(x, expected_sum, atol=0, rtol=0)  # the residual, updated in place
    # bfloat16: one rounding step apart at most, where float32 summation order tips a tie.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, expected, atol=tolerance, rtol=tolerance)


def test_add_rms_norm_checks_its_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="weight: contiguous"):
        ops.add_rms_norm(x, None, torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="delta: contiguous"):
        ops.add_rms_norm(x, torch.randn(2, 8), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="delta: contiguous"):
        ops.add_rms_norm(x, torch.randn(3, 8).to(torch.bfloat16), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="residual: contiguous float32"):
        ops.add_rms_norm(x.double(), None, torch.randn(8), 1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 40])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("dtype, cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
])
def test_rope_write_kv_matches_rope_and_cache_write(tokens, heads, kv_heads, dtype, cache_dtype):
    torch.manual_seed(tokens * 10 + heads)
    head_dim, num_blocks, block_size = 64, 12, 8
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [tokens, head_dim]
    cos, sin = cos.to(dtype), sin.to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    heads_view = qkv.view(tokens, -1, head_dim)
    # Rotated in float32 and rounded once (the native bfloat16 rotation rounds each op).
    expected_qk = apply_rope(heads_view[:, : heads + kv_heads].float(), cos.float(), sin.float()).to(dtype)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    write_kv(expected_k_cache, expected_v_cache, expected_qk[:, heads:], heads_view[:, heads + kv_heads :], slots)
    expected_v = heads_view[:, heads + kv_heads :].clone()

    ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads)

    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: a rounding step where fma order tips it
    torch.testing.assert_close(heads_view[:, : heads + kv_heads], expected_qk, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(heads_view[:, heads + kv_heads :], expected_v, atol=0, rtol=0)  # v untouched
    # A bfloat16 cache under float32: k rounded once from a float32 rotation whose last bit
    # may differ (fma order), so at most one bfloat16 step apart.
    cache_tolerance = tolerance if dtype == cache_dtype else 2**-7
    torch.testing.assert_close(k_cache, expected_k_cache, atol=1e-6, rtol=cache_tolerance)
    torch.testing.assert_close(v_cache, expected_v_cache, atol=0, rtol=0)


def test_rope_write_kv_checks_its_inputs():
    qkv, cos = torch.randn(2, 3 * 16), torch.randn(2, 16)
    cache = torch.randn(4, 4, 1, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_kv(qkv, cos, cos, cache, cache.clone(), torch.tensor([0, 16]), 1, 1)
    with pytest.raises(RuntimeError, match="qkv width"):
        ops.rope_write_kv(qkv, cos, cos, cache, cache.clone(), torch.tensor([0, 1]), 2, 1)
    with pytest.raises(RuntimeError, match="slots: contiguous int64"):
        ops.rope_write_kv(qkv, cos, cos, cache, cache.clone(), torch.tensor([0, 1], dtype=torch.int32), 1, 1)
    with pytest.raises(RuntimeError, match="the type of qkv or bfloat16 under float32"):  # no float32 cache under bfloat16
        ops.rope_write_kv(qkv.bfloat16(), cos.bfloat16(), cos.bfloat16(), cache, cache.clone(), torch.tensor([0, 1]), 1, 1)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_native(rows, dtype):
    torch.manual_seed(rows)
    inter = 1536 + 7  # a tail past the 16-wide vectors
    x = (torch.randn(rows, 2 * inter) * 4).to(dtype)
    gate, up = x.float().chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up).to(dtype)  # float32, rounded once
    out = ops.silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (rows, inter)
    # float32: libm's expf against torch's; bfloat16: the same rounding of the same float.
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_saturates_like_native_far_out(dtype):
    """exp overflows to inf for very negative gates and underflows for very positive ones:
    silu must still go to 0 and to the gate, never NaN."""
    gate = torch.tensor([-1e4, -200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0, 1e4] * 2)
    x = torch.cat([gate, torch.full_like(gate, 1.5)]).view(1, -1).to(dtype)
    expected = (torch.nn.functional.silu(gate.to(dtype).float()) * 1.5).to(dtype).view(1, -1)
    out = ops.silu_and_mul(x)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 8e-3)


def test_decode_attention_rejects_contexts_longer_than_their_block_table():
    k_cache = torch.zeros(8, 4, 1, 16)
    q, out = torch.zeros(1, 2, 16), torch.empty(1, 2, 16)
    tables = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="outside 1..8"):
        ops.paged_decode_attention(out, q, k_cache, k_cache, tables, torch.tensor([9]), 0.25)
    with pytest.raises(RuntimeError, match="outside 1..8"):
        ops.paged_decode_attention(out, q, k_cache, k_cache, tables, torch.tensor([0]), 0.25)
    ops.paged_decode_attention(out, q, k_cache, k_cache, tables, torch.tensor([8]), 0.25)


def test_silu_and_mul_checks_its_inputs():
    with pytest.raises(RuntimeError, match="2 \\* intermediate"):
        ops.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.silu_and_mul(torch.randn(2, 8, dtype=torch.float64))


amx = pytest.mark.skipif(not ops.prefill_attention_available(), reason="no AMX here (or not granted)")


def _prefill_reference(q, k_cache, v_cache, table, start, scale):
    """Float32 SDPA over the gathered context, the chunk's queries at start .. start + n - 1."""
    tokens, heads, head_dim = q.shape
    kv_heads, context = k_cache.shape[2], start + tokens
    keys = k_cache.index_select(0, table).view(-1, kv_heads, head_dim)[:context].float()
    values = v_cache.index_select(0, table).view(-1, kv_heads, head_dim)[:context].float()
    mask = torch.full((tokens, context), float("-inf")).triu_(start + 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=True,
    ).transpose(0, 1)  # [tokens, heads, head_dim]


@amx
# Partial query tiles (5, 17, 300), a chunk after a long cached prefix (128 at 1024),
# contexts not a multiple of 64 keys, one query, head_dim 128, block sizes 16 and 32.
@pytest.mark.parametrize("tokens, start, heads, kv_heads, head_dim, block_size", [
    (1, 0, 9, 3, 64, 16), (5, 0, 9, 3, 64, 16), (17, 3, 9, 3, 64, 16), (128, 1024, 9, 3, 64, 16),
    (37, 100, 4, 4, 64, 32), (300, 50, 8, 1, 64, 16), (20, 40, 4, 2, 128, 16),
])
def test_prefill_attention_matches_sdpa(tokens, start, heads, kv_heads, head_dim, block_size):
    torch.manual_seed(tokens + start)
    context = start + tokens
    num_blocks = -(-context // block_size) + 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks)[: -(-context // block_size)]
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # a strided view, as the model passes
    out = torch.empty(tokens, heads, head_dim, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    ops.prefill_attention(out, q, k_cache, v_cache, table, start, scale)
    # The probabilities are rounded to bfloat16 before the value product (~4e-3 relative).
    torch.testing.assert_close(out.float(), _prefill_reference(q, k_cache, v_cache, table, start, scale),
                               atol=2e-2, rtol=2e-2)


@amx
def test_prefill_attention_checks_its_inputs():
    k_cache = torch.zeros(4, 16, 1, 64, dtype=torch.bfloat16)
    q, out = torch.zeros(8, 2, 64, dtype=torch.bfloat16), torch.empty(8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        ops.prefill_attention(out, q, k_cache, k_cache, torch.tensor([0]), 10, 0.125)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.prefill_attention(out, q, k_cache, k_cache, torch.tensor([0, 4]), 10, 0.125)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.prefill_attention(out.float(), q.float(), k_cache.float(), k_cache.float(), torch.tensor([0]), 0, 0.125)
    ops.prefill_attention(out, q, k_cache, k_cache, torch.tensor([0, 3]), 10, 0.125)
