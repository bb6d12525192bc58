// Rotary embedding of q and k, in place in the fused qkv projection, and the write of
// k and v into the paged KV cache: one pass over the new tokens, on the CPU (float32 or
// bfloat16 tensors, float32 arithmetic; a bfloat16 cache may hold a float32 model's k and
// v, rounded once as they are written).
//
// Natively that is a dozen small ops per layer (two slices, a negation, a concatenation,
// two multiplies and an add for the rotation; a split, views and two index_copy_ for the
// cache), each costing more in dispatch than in arithmetic at decode batch sizes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "float_rows.h"

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

// T: the type of qkv, cos and sin; C: the cache's (T, or bfloat16 under float32).
template <typename T, typename C>
void run(T* base, const T* cos_ptr, const T* sin_ptr, C* k_out, C* v_out, const int64_t* slot_ptr, int64_t tokens,
         int64_t width, int64_t head_dim, int64_t num_heads, int64_t num_kv_heads) {
  const int64_t kv_width = num_kv_heads * head_dim, qk_width = (num_heads + num_kv_heads) * head_dim;
  at::parallel_for(0, tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    // bfloat16 tokens are rotated in float32 buffers (float_rows.h); float32 ones in place.
    std::vector<float> qk(std::is_same_v<T, float> ? 0 : qk_width), cs(std::is_same_v<T, float> ? 0 : 2 * head_dim);
    for (int64_t t = begin; t < end; ++t) {
      T* row = base + t * width;
      float* x;
      const float *c, *s;
      if constexpr (std::is_same_v<T, float>) {
        x = row, c = cos_ptr + t * head_dim, s = sin_ptr + t * head_dim;
      } else {
        coserve::to_float(row, qk.data(), qk_width);
        coserve::to_float(cos_ptr + t * head_dim, cs.data(), head_dim);
        coserve::to_float(sin_ptr + t * head_dim, cs.data() + head_dim, head_dim);
        x = qk.data(), c = cs.data(), s = cs.data() + head_dim;
      }
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate(x + h * head_dim, c, s, head_dim);
      if constexpr (!std::is_same_v<T, float>) coserve::from_float(x, row, qk_width);
      const T* k = row + num_heads * head_dim;
      if constexpr (std::is_same_v<T, C>) {
        std::memcpy(k_out + slot_ptr[t] * kv_width, k, kv_width * sizeof(T));
        std::memcpy(v_out + slot_ptr[t] * kv_width, k + kv_width, kv_width * sizeof(T));
      } else {  // float32 rows into a bfloat16 cache
        coserve::from_float(k, k_out + slot_ptr[t] * kv_width, kv_width);
        coserve::from_float(k + kv_width, v_out + slot_ptr[t] * kv_width, kv_width);
      }
    }
  });
}

// qkv: [tokens, (heads + 2 kv_heads) * head_dim]; q and k are rotated in place.
// cos, sin: [tokens, head_dim]. k_cache, v_cache: [blocks, block_size, kv_heads, head_dim];
// slots: [tokens] int64, the cache slot of each token. All float32 or all bfloat16
// (rotated in float32, rounded once), or float32 with bfloat16 caches.
void rope_write_kv(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  const auto type = qkv.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, "qkv: float32 or bfloat16");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv: contiguous [tokens, (heads + 2 kv_heads) * head_dim]");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && v_cache.scalar_type() == cache_type &&
                  (cache_type == type || (type == at::kFloat && cache_type == at::kBFloat16)) &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache, v_cache: contiguous [blocks, block_size, kv_heads, head_dim], the type of qkv or bfloat16 "
              "under float32");
  const int64_t tokens = qkv.size(0), head_dim = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == num_kv_heads, "kv_heads of the cache and the call differ");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qkv width is not (heads + 2 kv_heads) * head_dim");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == head_dim &&
                  cos.scalar_type() == type && sin.scalar_type() == type && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos, sin: contiguous [tokens, head_dim], the type of qkv");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == tokens && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots: contiguous int64 [tokens]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < num_slots, "slot ", slot_ptr[t], " is outside the cache");
  if (cache_type != type) {
    run<float, c10::BFloat16>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                              k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), slot_ptr, tokens,
                              qkv.size(1), head_dim, num_heads, num_kv_heads);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type, "rope_write_kv", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      run<scalar_t, scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                              k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slot_ptr, tokens,
                              qkv.size(1), head_dim, num_heads, num_kv_heads);
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
