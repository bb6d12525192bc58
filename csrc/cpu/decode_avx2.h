// Decode attention's two passes for CPUs with AVX2 and FMA but no AVX-512.
//
// The generic loop in paged_attention.cpp reads the cache once per kv head, ends every
// query . key product with a horizontal sum and keeps its value accumulators in
// memory. Here each pass reads a token's whole row once for all heads, sums the
// products of four tokens together (sum4) and keeps a head's output row in registers
// over 16 tokens. Measured on a 2-core AMD EPYC (AVX2 only), 30 layers' caches in
// rotation (bench/attention_kernel.py's layout), interleaved runs: float32 6-9% faster
// than the generic loop (3.3-3.6 against 3.6-3.7 ms a layer at 128 sequences x 256
// tokens), bfloat16 about 1.5x (8-12.6 GB/s of KV read against 5.4-8.5). Both stay
// near 12 GB/s, against ~28 GB/s that the machine streams contiguously: the blocks
// are scattered, and neither deeper prefetching nor huge pages moved that.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "prefetch_rows.h"

namespace coserve::avx2 {

// 8 values as float32, exactly: a bfloat16 is the high half of a float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// [sum(a[0]), sum(a[1]), sum(a[2]), sum(a[3])]: pairs added within 128-bit halves,
// then the two halves.
inline __m128 sum4(const __m256* a) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float sum1(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Every head's scores in one pass over the rows: out[h * ctx + t] = q_h . K_t, where
// K_t is token t's row of kv head h / group; query: [heads, 8 CH] float32, pre-scaled.
// Four tokens at a time: their rows (all kv heads, 4 x 768 bytes at the default
// model's layout) stay in L1 while every head reads them, and the cache streams each
// block of rows once.
template <typename T, int CH>
void scores(const float* query, const T* k, const int64_t* offsets, int64_t ctx, int64_t kv_heads,
            int64_t group, float* out, int64_t row_lines) {
  constexpr int D = 8 * CH;
  const int64_t heads = kv_heads * group;
  int64_t t = 0;
  for (; t + 4 <= ctx; t += 4) {
    prefetch_rows(k, offsets, t + 8, std::min<int64_t>(t + 12, ctx), row_lines);
    const T* rows[4] = {k + offsets[t], k + offsets[t + 1], k + offsets[t + 2], k + offsets[t + 3]};
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = (h / group) * D;
      const float* q = query + h * D;
      __m256 acc[4];
      const __m256 q0 = _mm256_loadu_ps(q);
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_mul_ps(q0, load8(rows[j] + kv));
      for (int c = 1; c < CH; ++c) {
        const __m256 qc = _mm256_loadu_ps(q + 8 * c);
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qc, load8(rows[j] + kv + 8 * c), acc[j]);
      }
      _mm_storeu_ps(out + h * ctx + t, sum4(acc));
    }
  }
  for (; t < ctx; ++t) {
    const T* row = k + offsets[t];
    for (int64_t h = 0; h < heads; ++h) {
      const T* key = row + (h / group) * D;
      const float* q = query + h * D;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), load8(key));
      for (int c = 1; c < CH; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), load8(key + 8 * c), acc);
      out[h * ctx + t] = sum1(acc);
    }
  }
}

// out[h] = sum_t p[h * ctx + t] V_t for every head, [heads, 8 CH] float32, in one pass
// over the rows: 16 tokens at a time, and over them each head's output row in CH
// registers (loaded and stored once per 16 tokens).
template <typename T, int CH>
void values(const float* p, const T* v, const int64_t* offsets, int64_t ctx, int64_t kv_heads, int64_t group,
            float* out, int64_t row_lines) {
  constexpr int D = 8 * CH;
  const int64_t heads = kv_heads * group;
  for (int64_t i = 0; i < heads * D; ++i) out[i] = 0.f;
  for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
    const int64_t t1 = std::min<int64_t>(t0 + 16, ctx);
    prefetch_rows(v, offsets, t0 + 16, std::min<int64_t>(t0 + 32, ctx), row_lines);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = (h / group) * D;
      float* o = out + h * D;
      __m256 acc[CH];
      for (int c = 0; c < CH; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
      for (int64_t t = t0; t < t1; ++t) {
        const T* row = v + offsets[t] + kv;
        const __m256 w = _mm256_set1_ps(p[h * ctx + t]);
        for (int c = 0; c < CH; ++c) acc[c] = _mm256_fmadd_ps(w, load8(row + 8 * c), acc[c]);
      }
      for (int c = 0; c < CH; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
    }
  }
}

using ScoresFn = void (*)(const float*, const void*, const int64_t*, int64_t, int64_t, int64_t, float*, int64_t);
using ValuesFn = ScoresFn;

template <typename T, int CH>
void scores_fn(const float* q, const void* k, const int64_t* offsets, int64_t ctx, int64_t kv_heads, int64_t group,
               float* out, int64_t row_lines) {
  scores<T, CH>(q, static_cast<const T*>(k), offsets, ctx, kv_heads, group, out, row_lines);
}
template <typename T, int CH>
void values_fn(const float* p, const void* v, const int64_t* offsets, int64_t ctx, int64_t kv_heads, int64_t group,
               float* out, int64_t row_lines) {
  values<T, CH>(p, static_cast<const T*>(v), offsets, ctx, kv_heads, group, out, row_lines);
}

// The two passes for this (type, head_dim), or nulls for the generic loop.
template <typename T>
std::pair<ScoresFn, ValuesFn> passes(int64_t head_dim) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (head_dim == 64) return {&scores_fn<T, 8>, &values_fn<T, 8>};
    if (head_dim == 128) return {&scores_fn<T, 16>, &values_fn<T, 16>};
  }
  return {nullptr, nullptr};
}

}  // namespace coserve::avx2
