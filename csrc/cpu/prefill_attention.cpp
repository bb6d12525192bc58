// Causal attention of one prefill chunk over its sequence's paged KV cache, in
// bfloat16 on AMX tiles (CPU).
//
// torch's CPU flash attention ran 128 queries over 1,152 cached keys (SmolLM2: 9 heads
// of 64, 3 KV heads) at ~0.4 TFLOP/s on the 2-core Xeon with AMX, ~45% of a
// prefix-cached prefill iteration. Here the score and value products run as AMX tile
// dot products (16 x 16 float32 results from 16 x 32 bfloat16 operands) and only the
// softmax runs on AVX-512; with 64-dim heads the softmax is most of the time left, so
// it takes a short exp2 polynomial and moves a row's maximum only when a score passes
// it by 2^8. Same chunk, same machine: 0.80 -> 0.42 ms alone, 128 fresh queries
// 0.37 -> 0.07 ms; in the engine (8 such chunks, 30 layers) 190 -> 140 ms an iteration.
//
// Per KV head the chunk's context is first packed into the layout AMX's second operand
// takes (pairs of bfloat16 along the reduced dimension in each 32-bit element): K in
// tiles of 16 keys x 32 head dims, V in tiles of 32 keys x 16 head dims, gathered
// through the block table. Then per query head and 16 queries: scores for 64 keys at a
// time (four tiles), the online softmax (running max and sum per row, the accumulated
// output rescaled when the max moves), and the output accumulated in float32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "float_rows.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define COSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

#if defined(COSERVE_AMX)

constexpr int64_t kRows = 16;   // queries per tile
constexpr int64_t kKeys = 64;   // keys per step: four 16-key score tiles
constexpr int64_t kPairs = 32;  // bfloat16 values in a 64-byte tile row
constexpr float kMasked = -1e30f;  // finite: -ffast-math assumes no infinities

// Linux hands out the AMX register state on request, once per process.
bool amx_granted() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: scores, then the output accumulator (tile 0); 4: the first operand (queries,
// then probabilities); 6: the second (packed K or V). All 16 rows of 64 bytes.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// Transposes a 16 x 16 matrix of 32-bit values held one row per register, in place:
// pairs within 128-bit lanes, then 4 x 4 blocks, then the lanes across registers.
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// The context of one KV head in the layout AMX's second operand takes, keys padded
// with zeros to a multiple of kKeys:
//   k: [key blocks of 16][head_dim / 32][16 dim pairs][16 keys] uint32
//   v: [key blocks of 32][head_dim / 16][16 key pairs][16 dims] uint32
struct ContextRows {
  const uint16_t* k_cache;
  const uint16_t* v_cache;
  const int64_t* table;
  int64_t block_size, kv_heads, kv_head, head_dim, context;

  const uint16_t* row(const uint16_t* cache, int64_t t) const {
    return cache + ((table[t / block_size] * block_size + t % block_size) * kv_heads + kv_head) * head_dim;
  }
};

// Keys [kb * 16, kb * 16 + 16): a 16 x 16 transpose of 32-bit pairs per 32 head dims.
void pack_key_block(const ContextRows& c, int64_t kb, uint32_t* k_out) {
  const int64_t halves = c.head_dim / kPairs;
  for (int64_t h = 0; h < halves; ++h) {
    __m512i rows[16];
    for (int64_t n = 0; n < 16; ++n) {
      const int64_t t = kb * 16 + n;
      rows[n] = t < c.context ? _mm512_loadu_si512(c.row(c.k_cache, t) + h * kPairs) : _mm512_setzero_si512();
    }
    transpose16(rows);
    uint32_t* tile = k_out + (kb * halves + h) * 256;
    for (int64_t r = 0; r < 16; ++r) _mm512_storeu_si512(tile + r * 16, rows[r]);
  }
}

// Keys [vb * 32, vb * 32 + 32): consecutive keys' values interleaved, per 16 head dims.
void pack_value_block(const ContextRows& c, int64_t vb, uint32_t* v_out) {
  const int64_t groups = c.head_dim / 16;
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t t0 = vb * 32 + 2 * r, t1 = t0 + 1;
    const uint16_t* even = t0 < c.context ? c.row(c.v_cache, t0) : nullptr;
    const uint16_t* odd = t1 < c.context ? c.row(c.v_cache, t1) : nullptr;
    for (int64_t j = 0; j < groups; ++j) {
      const __m512i lo = even ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + j * 16)))
                              : _mm512_setzero_si512();
      const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + j * 16)))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(v_out + (vb * groups + j) * 256 + r * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// Scores of 16 queries against keys [k0, k0 + 64) into s [16][64] float32.
inline void score_step(const uint16_t* q, int64_t head_dim, const uint32_t* k_packed, int64_t k0, float* s) {
  const int64_t halves = head_dim / kPairs;
  const uint32_t* base = k_packed + (k0 / 16) * halves * 256;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t h = 0; h < halves; ++h) {
    _tile_loadd(4, q + h * kPairs, head_dim * 2);
    _tile_loadd(6, base + (0 * halves + h) * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(6, base + (1 * halves + h) * 256, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(6, base + (2 * halves + h) * 256, 64);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(6, base + (3 * halves + h) * 256, 64);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, s + 0, kKeys * 4);
  _tile_stored(1, s + 16, kKeys * 4);
  _tile_stored(2, s + 32, kKeys * 4);
  _tile_stored(3, s + 48, kKeys * 4);
}

// o [16][head_dim] float32 += p [16][64] bfloat16 . V[k0, k0 + 64)
inline void value_step(const uint16_t* p, const uint32_t* v_packed, int64_t head_dim, int64_t k0, float* o) {
  const int64_t groups = head_dim / 16;
  for (int64_t j = 0; j < groups; ++j) {
    _tile_loadd(0, o + j * 16, head_dim * 4);
    for (int64_t half = 0; half < 2; ++half) {
      _tile_loadd(4, p + half * kPairs, kKeys * 2);
      _tile_loadd(6, v_packed + ((k0 / 32 + half) * groups + j) * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, o + j * 16, head_dim * 4);
  }
}

// 2^x on 16 lanes for x <= 0, to ~1e-5 relative: the probabilities are rounded to
// bfloat16 (~4e-3) before they are used, so a degree-4 polynomial is plenty, and the
// exponential is most of the softmax's cost.
inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// A row's running maximum moves only when a score exceeds it by this much (log2 units):
// probabilities then reach at most 2^8 before normalisation, harmless in float32 and
// bfloat16, and the output is rescaled far less often.
constexpr float kMaxSlack = 8.f;

// One tile of queries [i0, i0 + rows) of one head; writes its rows of `out`.
void attend_tile(const c10::BFloat16* q, int64_t q_row_stride, c10::BFloat16* out, int64_t out_row_stride,
                 int64_t rows, int64_t i0, int64_t start, int64_t context, int64_t head_dim,
                 const uint32_t* k_packed, const uint32_t* v_packed, float scale) {
  alignas(64) uint16_t qbuf[kRows * 256];
  alignas(64) float s[kRows * kKeys];
  alignas(64) uint16_t p[kRows * kKeys];
  alignas(64) float sums[kRows * 16] = {};  // per row, 16 partial sums of its probabilities
  alignas(64) float o[kRows * 256] = {};  // [16][head_dim]
  float row_max[kRows];  // log2 units
  for (int64_t m = 0; m < kRows; ++m) {
    row_max[m] = kMasked;
    if (m < rows) {
      std::memcpy(qbuf + m * head_dim, q + (i0 + m) * q_row_stride, head_dim * 2);
    } else {
      std::memset(qbuf + m * head_dim, 0, head_dim * 2);
    }
  }
  const int64_t last_visible = start + i0 + rows - 1;  // the last row's last key
  const int64_t first_row_visible = std::min(start + i0, context - 1);  // the first row's
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 scale_v = _mm512_set1_ps(scale * 1.44269504f);  // scores in log2 units
  const __m512 masked_v = _mm512_set1_ps(kMasked);
  for (int64_t k0 = 0; k0 <= last_visible; k0 += kKeys) {
    score_step(qbuf, head_dim, k_packed, k0, s);
    // Every row sees every key of this step: no masking.
    const bool all_visible = k0 + kKeys - 1 <= first_row_visible;
    for (int64_t m = 0; m < kRows; ++m) {
      __m512 x[4];
      __mmask16 keep[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
      __m512 mx = masked_v;
      if (all_visible) {
        for (int c = 0; c < 4; ++c) {
          x[c] = _mm512_mul_ps(_mm512_loadu_ps(s + m * kKeys + c * 16), scale_v);
          mx = _mm512_max_ps(mx, x[c]);
        }
      } else {
        // Keys up to the query's own position are visible (and none past the context).
        const int64_t visible = std::min(start + i0 + std::min(m, rows - 1), context - 1) - k0 + 1;
        const __m512i limit = _mm512_set1_epi32(static_cast<int>(std::max<int64_t>(visible, 0)));
        for (int c = 0; c < 4; ++c) {
          keep[c] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(c * 16)), limit);
          x[c] = _mm512_mask_mul_ps(masked_v, keep[c], _mm512_loadu_ps(s + m * kKeys + c * 16), scale_v);
          mx = _mm512_max_ps(mx, x[c]);
        }
      }
      __m512 sum = _mm512_loadu_ps(sums + m * 16);
      if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(row_max[m] + kMaxSlack), _CMP_GT_OQ) || row_max[m] == kMasked) {
        const float new_max = std::max(row_max[m], _mm512_reduce_max_ps(mx));
        const __m512 alpha = exp2_16(_mm512_set1_ps(std::max(row_max[m] - new_max, -126.f)));
        row_max[m] = new_max;
        sum = _mm512_mul_ps(sum, alpha);
        float* orow = o + m * head_dim;
        for (int64_t d = 0; d < head_dim; d += 16) {
          _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), alpha));
        }
      }
      const __m512 max_v = _mm512_set1_ps(row_max[m]);
      for (int c = 0; c < 4; ++c) {
        // Masked keys sit ~1e30 below the max: zeroed rather than exponentiated.
        const __m512 e = _mm512_maskz_mov_ps(keep[c], exp2_16(_mm512_sub_ps(x[c], max_v)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + m * kKeys + c * 16), (__m256i)_mm512_cvtneps_pbh(e));
      }
      _mm512_storeu_ps(sums + m * 16, sum);
    }
    value_step(p, v_packed, head_dim, k0, o);
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* orow = o + m * head_dim;
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_loadu_ps(sums + m * 16)));
    for (int64_t d = 0; d < head_dim; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), inv));
    coserve::from_float(orow, out + (i0 + m) * out_row_stride, head_dim);
  }
}

#endif  // COSERVE_AMX

}  // namespace

bool prefill_attention_supported() {
#if defined(COSERVE_AMX)
  return amx_granted();
#else
  return false;
#endif
}

// out[i, h] = softmax(scale * q[i, h] . K^T, keys 0 .. start + i) V for the chunk's
// queries i (positions start + i), K and V of kv head h / (heads / kv_heads) read from
// the cache through `block_table`.
void prefill_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_table, int64_t start, double scale) {
  TORCH_CHECK(prefill_attention_supported(), "prefill_attention needs AMX (this build or CPU has none)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "prefill_attention computes in bfloat16");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [tokens, heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q rows must be contiguous per token");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) == out.size(2), "out rows must be contiguous per token");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be "
              "[num_blocks, block_size, kv_heads, head_dim] alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "head_dim of q and cache differ");
  TORCH_CHECK(head_dim % 32 == 0 && head_dim <= 256, "head_dim must be a multiple of 32, at most 256");
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1 && block_table.is_contiguous(),
              "block_table must be a contiguous int64 vector");
  TORCH_CHECK(tokens >= 1 && start >= 0, "need at least one query and a non-negative start");
  const int64_t context = start + tokens;
  TORCH_CHECK(context <= block_table.size(0) * block_size, "context of ", context, " tokens exceeds its block table");
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < (context + block_size - 1) / block_size; ++b) {
    TORCH_CHECK(table[b] >= 0 && table[b] < k_cache.size(0), "block table entry out of range");
  }
#if defined(COSERVE_AMX)
  const int64_t padded = (context + kKeys - 1) / kKeys * kKeys;
  const int64_t per_head = padded * head_dim / 2;  // uint32 values of K (and of V) per KV head
  // Kept between calls (per calling thread): a fresh buffer of this size is fresh pages,
  // and faulting them in took a sixth of the call.
  thread_local std::vector<uint32_t> k_buffer, v_buffer;
  if (static_cast<int64_t>(k_buffer.size()) < kv_heads * per_head) {
    k_buffer.resize(kv_heads * per_head);
    v_buffer.resize(kv_heads * per_head);
  }
  uint32_t* k_packed = k_buffer.data();  // the worker threads see these, not their own buffers
  uint32_t* v_packed = v_buffer.data();
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  // Packed in units of kKeys keys of one KV head, spread over the threads.
  const int64_t units = padded / kKeys;
  at::parallel_for(0, kv_heads * units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / units, unit = w % units;
      const ContextRows rows{kc, vc, table, block_size, kv_heads, h, head_dim, context};
      for (int64_t kb = unit * 4; kb < unit * 4 + 4; ++kb) pack_key_block(rows, kb, k_packed + h * per_head);
      for (int64_t vb = unit * 2; vb < unit * 2 + 2; ++vb) pack_value_block(rows, vb, v_packed + h * per_head);
    }
  });
  const int64_t tiles = (tokens + kRows - 1) / kRows, group = heads / kv_heads;
  const auto* qp = q.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  // Latest query tiles first: they see the most keys, so the threads end together.
  at::parallel_for(0, heads * tiles, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    for (int64_t w = begin; w < end; ++w) {
      const int64_t head = w % heads, tile = tiles - 1 - w / heads, kv = head / group;
      const int64_t i0 = tile * kRows;
      attend_tile(qp + head * head_dim, q.stride(0), op + head * head_dim, out.stride(0),
                  std::min(kRows, tokens - i0), i0, start, context, head_dim,
                  k_packed + kv * per_head, v_packed + kv * per_head, static_cast<float>(scale));
    }
    _tile_release();
  });
#endif
}

TORCH_LIBRARY_FRAGMENT(coserve, m) {
  m.def("prefill_attention_supported() -> bool", &prefill_attention_supported);
  m.def("prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "int start, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
