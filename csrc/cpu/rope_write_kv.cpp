// Rotary embedding of q and k, in place in the fused qkv projection, and the write of
// k and v into the paged KV cache: one pass over the new tokens, float32, on the CPU.
//
// Natively that is a dozen small ops per layer (two slices, a negation, a concatenation,
// two multiplies and an add for the rotation; a split, views and two index_copy_ for the
// cache), each costing more in dispatch than in arithmetic at decode batch sizes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace {

// Tokens per parallel work item: a decode batch is done by one thread; prefill splits.
constexpr int64_t kTokensPerTask = 16;

// x: one head, [head_dim]; c, s: that token's cos and sin rows, [head_dim].
// x <- x * c + rotate_half(x) * s, rotate_half(x) = (-x[half:], x[:half]).
inline void rotate(float* x, const float* c, const float* s, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * c[i] - b * s[i];
    x[i + half] = b * c[i + half] + a * s[i + half];
  }
}

// qkv: [tokens, (heads + 2 kv_heads) * head_dim] float32; q and k are rotated in place.
// cos, sin: [tokens, head_dim] float32. k_cache, v_cache: [blocks, block_size, kv_heads,
// head_dim] float32; slots: [tokens] int64, the cache slot of each token.
void rope_write_kv(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(),
              "qkv: contiguous float32 [tokens, (heads + 2 kv_heads) * head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache, v_cache: contiguous float32 [blocks, block_size, kv_heads, head_dim]");
  const int64_t tokens = qkv.size(0), head_dim = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == num_kv_heads, "kv_heads of the cache and the call differ");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qkv width is not (heads + 2 kv_heads) * head_dim");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == head_dim &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos, sin: contiguous float32 [tokens, head_dim]");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == tokens && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots: contiguous int64 [tokens]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t width = qkv.size(1), kv_width = num_kv_heads * head_dim;
  float* base = qkv.data_ptr<float>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = sin.data_ptr<float>();
  float* k_out = k_cache.data_ptr<float>();
  float* v_out = v_cache.data_ptr<float>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < num_slots, "slot ", slot_ptr[t], " is outside the cache");
  at::parallel_for(0, tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = base + t * width;
      const float* c = cos_ptr + t * head_dim;
      const float* s = sin_ptr + t * head_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate(row + h * head_dim, c, s, head_dim);
      const float* k = row + num_heads * head_dim;
      std::memcpy(k_out + slot_ptr[t] * kv_width, k, kv_width * sizeof(float));
      std::memcpy(v_out + slot_ptr[t] * kv_width, k + kv_width, kv_width * sizeof(float));
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coserve, m) {
  m.def(
      "rope_write_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, "
      "int num_heads, int num_kv_heads) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("rope_write_kv", &rope_write_kv); }
