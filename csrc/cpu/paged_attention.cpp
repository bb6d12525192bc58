// Decode attention straight from the paged KV cache, on the CPU.
//
// The native path gathers every decode sequence's blocks into a contiguous copy
// before SDPA; at 32 sequences that copy moved more bytes than the attention read.
// This kernel reads K and V in place through the block table, one pass, with an
// exact (two-pass) softmax in float32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

template <typename T>
void decode_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // Strides of q/out rows may differ from a packed layout (q is a view of qkv).
  const int64_t q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t token_stride = kv_heads * head_dim;  // between consecutive slots of the cache

  // One work item per sequence, all heads together: each cached token's row (all kv
  // heads, contiguous) is read once, front to back, which the hardware prefetcher
  // streams well; per-(sequence, head) items read strided slices and ran ~3x slower.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(num_heads * head_dim), acc(num_heads * head_dim);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t ctx = lens[seq];
      scores.resize(num_heads * ctx);
      for (int64_t h = 0; h < num_heads; ++h) {
        const T* src = q_ptr + seq * q_seq_stride + h * q_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) query[h * head_dim + d] = static_cast<float>(src[d]) * float(scale);
      }
      // Pass 1: scores for every cached token, through the block table. scores: [heads, ctx]
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t block = tables[seq * max_blocks + t / block_size];
        const T* row = k_ptr + (block * block_size + t % block_size) * token_stride;
        for (int64_t h = 0; h < num_heads; ++h)
          scores[h * ctx + t] = dot(&query[h * head_dim], row + (h / group) * head_dim, head_dim);
      }
      // Softmax per head; the exp loop vectorises (libmvec) under -ffast-math.
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = &scores[h * ctx];
        float top = s[0];
        for (int64_t t = 1; t < ctx; ++t) top = std::max(top, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < ctx; ++t) {
          const float e = expf(s[t] - top);
          s[t] = e;
          sum += e;
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < ctx; ++t) s[t] *= inv;
      }
      // Pass 2: weighted sum of values, again one row per token.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t block = tables[seq * max_blocks + t / block_size];
        const T* row = v_ptr + (block * block_size + t % block_size) * token_stride;
        for (int64_t h = 0; h < num_heads; ++h)
          axpy(scores[h * ctx + t], row + (h / group) * head_dim, &acc[h * head_dim], head_dim);
      }
      T* dst = out_ptr + seq * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) dst[i] = static_cast<T>(acc[i]);
    }
  });
}

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [num_seqs, heads, head_dim]");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(q.stride(2) == 1, "q rows must be contiguous in head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q and cache differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(),
              "q, cache and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [num_seqs, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0),
              "context_lens must be int64 [num_seqs]");
  TORCH_CHECK(block_tables.size(0) == q.size(0), "one block table per sequence");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(out, q, k_cache, v_cache, block_tables, context_lens.contiguous(), scale);
  });
}

}  // namespace

TORCH_LIBRARY(coserve, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
