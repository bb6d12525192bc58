// Decode attention straight from the paged KV cache, on the CPU.
//
// The native path gathers every decode sequence's blocks into a contiguous copy
// before SDPA; at 32 sequences that copy moved more bytes than the attention read.
// This kernel reads K and V in place through the block table, one pass, with an
// exact (two-pass) softmax in float32. The cache is of q's type, or bfloat16 under float32
// queries (half the bytes to read: a float32 model with a bfloat16 cache).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "float_rows.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#include "prefetch_rows.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "decode_avx2.h"
#define COSERVE_DECODE_AVX2 1
#endif

namespace {

#if defined(__AVX512F__) || defined(COSERVE_DECODE_AVX2)
using coserve::prefetch_rows;
#endif

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

#if defined(__AVX512F__)

// The sums of 16 vectors, as one vector: lane i = the sum of a[i]'s 16 lanes.
// Pairs are folded within 128-bit blocks, then the blocks across vectors.
inline __m512 sum16(const __m512* a) {
  __m512 quads[4];  // quads[i] lane 4b + j: the sum of a[4i + j]'s block b
  for (int i = 0; i < 4; ++i) {
    const __m512* v = a + 4 * i;
    // [v0_0 + v0_2, v1_0 + v1_2, v0_1 + v0_3, v1_1 + v1_3] in each block
    const __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
    const __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(p01, p23, 0x44), _mm512_shuffle_ps(p01, p23, 0xEE));
  }
  // Sum the four blocks of each quad: blocks (0, 2) + (1, 3), twice.
  const __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, 0x88), _mm512_shuffle_f32x4(q01, q23, 0xDD));
}

// A cached row of 16 * CH values as CH float32 vectors. A bfloat16 row is read in
// lane order: each 32-bit lane holds two values, the even one in its low half, and
// shifting it up (even) or masking the low half off (odd) makes each a float32 in one
// instruction, two vectors per 64-byte load. Widening in element order cost a shuffle
// and a shift per 16 values, and with KV from memory the bfloat16 kernel was bound by
// those (12.6 GB/s against float32's 16.4 at 128 sequences x 192 tokens). Dot products
// do not care about the order, as long as the query is laid out the same way
// (to_lane_order); sums of rows come out in it and go back by from_lane_order.
template <int CH>
inline void load_row(const float* row, __m512* out) {
  for (int c = 0; c < CH; ++c) out[c] = _mm512_loadu_ps(row + 16 * c);
}
template <int CH>
inline void load_row(const c10::BFloat16* row, __m512* out) {
  static_assert(CH % 2 == 0, "bfloat16 rows go 32 values at a time");
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int c = 0; c < CH; c += 2) {
    const __m512i pairs = _mm512_loadu_si512(row + 16 * c);
    out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    out[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
  }
}

// 32 float32 values [a, b] (a: the first 16) rearranged: a takes the lanes `first`
// picks from [a, b], b those `second` picks.
inline void permute_pair(__m512& a, __m512& b, __m512i first, __m512i second) {
  const __m512 x = _mm512_permutex2var_ps(a, first, b), y = _mm512_permutex2var_ps(a, second, b);
  a = x;
  b = y;
}

// In and out of load_row's bfloat16 order: (evens, odds).
inline void to_lane_order(__m512& a, __m512& b) {
  permute_pair(a, b, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0),
               _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1));
}
inline void from_lane_order(__m512& a, __m512& b) {
  permute_pair(a, b, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0),
               _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8));
}

// The G query heads that share one kv head, over that head's cached rows, with
// head_dim = 16 * CH. G and CH are compile-time so that the query vectors and the
// output accumulators stay in registers, and each cached row is widened to float32
// once for all G heads. The generic loop below re-read and re-converted a row per
// query head and kept its accumulators in memory: at 128 sequences of 192 tokens it
// ran at 11 GB/s in bfloat16 (compute-bound) against 20 GB/s from memory in float32.
// Dispatched for G * CH <= 16: the accumulators, a row and the weight fit 32 registers.
template <typename T, int G, int CH>
struct HeadGroup {
  static constexpr bool kPaired = std::is_same_v<T, c10::BFloat16>;  // rows in load_row's lane order

  // q . k left as 16 lane sums (a dot product before its horizontal sum).
  static __m512 lane_products(const __m512* q, const __m512* k) {
    __m512 acc = _mm512_mul_ps(q[0], k[0]);
    for (int c = 1; c < CH; ++c) acc = _mm512_fmadd_ps(q[c], k[c], acc);
    return acc;
  }

  // scores[h * ctx + t] = q_h . K_t for t < ctx; query: [G, 16 CH] float32, pre-scaled.
  // Tokens go 16 at a time: each dot product is left as 16 partial sums, and the 16
  // of a head are summed together by sum16 (~3 instructions a score instead of ~10
  // for a horizontal sum each).
  static void scores(const float* query, const T* base, const int64_t* offsets, int64_t ctx, float* out,
                     int64_t prefetch_lines) {
    __m512 q[G][CH];
    for (int h = 0; h < G; ++h) {
      for (int c = 0; c < CH; ++c) q[h][c] = _mm512_loadu_ps(query + (h * CH + c) * 16);
      if constexpr (kPaired)
        for (int c = 0; c < CH; c += 2) to_lane_order(q[h][c], q[h][c + 1]);
    }
    __m512 partial[G][16];
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) {
      prefetch_rows(base, offsets, t + 16, std::min<int64_t>(t + 32, ctx), prefetch_lines);
      for (int j = 0; j < 16; ++j) {
        const T* row = base + offsets[t + j];
        __m512 k[CH];
        load_row<CH>(row, k);
        for (int h = 0; h < G; ++h) partial[h][j] = lane_products(q[h], k);
      }
      for (int h = 0; h < G; ++h) _mm512_storeu_ps(out + h * ctx + t, sum16(partial[h]));
    }
    for (; t < ctx; ++t) {
      const T* row = base + offsets[t];
      __m512 k[CH];
      load_row<CH>(row, k);
      for (int h = 0; h < G; ++h) out[h * ctx + t] = _mm512_reduce_add_ps(lane_products(q[h], k));
    }
  }

  // out[h] = sum_t p[h * ctx + t] V_t, [G, 16 CH] float32.
  static void values(const float* p, const T* base, const int64_t* offsets, int64_t ctx, float* out,
                     int64_t prefetch_lines) {
    __m512 acc[G][CH];
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < CH; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; ++t) {
      if (t % 16 == 0) prefetch_rows(base, offsets, t + 16, std::min<int64_t>(t + 32, ctx), prefetch_lines);
      const T* row = base + offsets[t];
      __m512 v[CH];
      load_row<CH>(row, v);
      for (int h = 0; h < G; ++h) {
        const __m512 w = _mm512_set1_ps(p[h * ctx + t]);
        for (int c = 0; c < CH; ++c) acc[h][c] = _mm512_fmadd_ps(w, v[c], acc[h][c]);
      }
    }
    for (int h = 0; h < G; ++h) {
      if constexpr (kPaired)
        for (int c = 0; c < CH; c += 2) from_lane_order(acc[h][c], acc[h][c + 1]);
      for (int c = 0; c < CH; ++c) _mm512_storeu_ps(out + (h * CH + c) * 16, acc[h][c]);
    }
  }
};

using GroupFn = void (*)(const float*, const void*, const int64_t*, int64_t, float*, int64_t);

template <typename T, int G, int CH>
void group_scores(const float* q, const void* base, const int64_t* offsets, int64_t ctx, float* out,
                  int64_t prefetch_lines) {
  HeadGroup<T, G, CH>::scores(q, static_cast<const T*>(base), offsets, ctx, out, prefetch_lines);
}
template <typename T, int G, int CH>
void group_values(const float* p, const void* base, const int64_t* offsets, int64_t ctx, float* out,
                  int64_t prefetch_lines) {
  HeadGroup<T, G, CH>::values(p, static_cast<const T*>(base), offsets, ctx, out, prefetch_lines);
}

// The register-resident kernels for this (type, group, head_dim), or null for the generic loop.
template <typename T>
std::pair<GroupFn, GroupFn> group_kernels(int64_t group, int64_t head_dim) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
#define COSERVE_GROUP(G, CH) \
    if (group == G && head_dim == 16 * CH) return {&group_scores<T, G, CH>, &group_values<T, G, CH>};
    COSERVE_GROUP(1, 4) COSERVE_GROUP(2, 4) COSERVE_GROUP(3, 4) COSERVE_GROUP(4, 4)
    COSERVE_GROUP(1, 8) COSERVE_GROUP(2, 8)
#undef COSERVE_GROUP
  }
  return {nullptr, nullptr};
}
#endif

// Q: the type of q and out; T: the cache's (the same, or bfloat16 under float32 queries).
template <typename Q, typename T>
void decode_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const Q* q_ptr = q.data_ptr<Q>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  Q* out_ptr = out.data_ptr<Q>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // Strides of q/out rows may differ from a packed layout (q is a view of qkv).
  const int64_t q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t token_stride = kv_heads * head_dim;  // between consecutive slots of the cache
  const int64_t row_lines = (token_stride * int64_t(sizeof(T)) + 63) / 64;  // cache lines of one token's K (or V)
#if defined(__AVX512F__)
  const auto [group_scores_fn, group_values_fn] = group_kernels<T>(group, head_dim);
#else
  constexpr void* group_scores_fn = nullptr;
#endif
#if defined(COSERVE_DECODE_AVX2)
  const auto [rows_scores_fn, rows_values_fn] = coserve::avx2::passes<T>(head_dim);
#endif

  // One work item per sequence, all heads together.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(num_heads * head_dim), acc(num_heads * head_dim);
    std::vector<int64_t> offsets;  // [ctx]: each cached token's row in the cache, through the block table
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t ctx = lens[seq];
      scores.resize(num_heads * ctx);
      offsets.resize(ctx);
      for (int64_t t = 0; t < ctx; ++t)
        offsets[t] = (tables[seq * max_blocks + t / block_size] * block_size + t % block_size) * token_stride;
      for (int64_t h = 0; h < num_heads; ++h) {
        const Q* src = q_ptr + seq * q_seq_stride + h * q_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) query[h * head_dim + d] = static_cast<float>(src[d]) * float(scale);
      }
      // Pass 1: scores for every cached token. scores: [heads, ctx]
      if (group_scores_fn != nullptr) {
#if defined(__AVX512F__)
        prefetch_rows(k_ptr, offsets.data(), 0, std::min<int64_t>(16, ctx), row_lines);
        prefetch_rows(v_ptr, offsets.data(), 0, std::min<int64_t>(16, ctx), row_lines);
        // The first kv head's pass fetches whole token rows, every head's: the later
        // passes find them in cache.
        for (int64_t g = 0; g < kv_heads; ++g)
          group_scores_fn(&query[g * group * head_dim], k_ptr + g * head_dim, offsets.data(), ctx,
                          &scores[g * group * ctx], g == 0 ? row_lines : 0);
#endif
#if defined(COSERVE_DECODE_AVX2)
      } else if (rows_scores_fn != nullptr) {
        prefetch_rows(k_ptr, offsets.data(), 0, std::min<int64_t>(8, ctx), row_lines);
        prefetch_rows(v_ptr, offsets.data(), 0, std::min<int64_t>(16, ctx), row_lines);
        rows_scores_fn(query.data(), k_ptr, offsets.data(), ctx, kv_heads, group, scores.data(), row_lines);
#endif
      } else {
        for (int64_t t = 0; t < ctx; ++t) {
          const T* row = k_ptr + offsets[t];
          for (int64_t h = 0; h < num_heads; ++h)
            scores[h * ctx + t] = dot(&query[h * head_dim], row + (h / group) * head_dim, head_dim);
        }
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
      // Pass 2: weighted sum of values.
      if (group_scores_fn != nullptr) {
#if defined(__AVX512F__)
        for (int64_t g = 0; g < kv_heads; ++g)
          group_values_fn(&scores[g * group * ctx], v_ptr + g * head_dim, offsets.data(), ctx,
                          &acc[g * group * head_dim], g == 0 ? row_lines : 0);
#endif
#if defined(COSERVE_DECODE_AVX2)
      } else if (rows_scores_fn != nullptr) {
        rows_values_fn(scores.data(), v_ptr, offsets.data(), ctx, kv_heads, group, acc.data(), row_lines);
#endif
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < ctx; ++t) {
          const T* row = v_ptr + offsets[t];
          for (int64_t h = 0; h < num_heads; ++h)
            axpy(scores[h * ctx + t], row + (h / group) * head_dim, &acc[h * head_dim], head_dim);
        }
      }
      Q* dst = out_ptr + seq * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) dst[i] = static_cast<Q>(acc[i]);
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
  TORCH_CHECK(q.scalar_type() == out.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  (q.scalar_type() == k_cache.scalar_type() ||
                   (q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16)),
              "q and out must share a dtype, the caches that one or bfloat16 under float32 q");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [num_seqs, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0),
              "context_lens must be int64 [num_seqs]");
  TORCH_CHECK(block_tables.size(0) == q.size(0), "one block table per sequence");
  const auto lens = context_lens.contiguous();
  {  // A context longer than its table would read blocks that are not the sequence's.
    const int64_t* len = lens.data_ptr<int64_t>();
    const int64_t capacity = block_tables.size(1) * k_cache.size(1);
    for (int64_t s = 0; s < lens.numel(); ++s)
      TORCH_CHECK(len[s] >= 1 && len[s] <= capacity, "context length ", len[s], " of sequence ", s,
                  " is outside 1..", capacity, " (its block table's tokens)");
  }
  if (q.scalar_type() != k_cache.scalar_type()) {  // float32 queries over a bfloat16 cache
    decode_kernel<float, c10::BFloat16>(out, q, k_cache, v_cache, block_tables, lens, scale);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t, scalar_t>(out, q, k_cache, v_cache, block_tables, lens, scale);
  });
}

}  // namespace

TORCH_LIBRARY(coserve, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
