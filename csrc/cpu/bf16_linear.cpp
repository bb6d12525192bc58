// y = x W^T (+ b) for decode-sized batches, with W stored in bfloat16 and all
// arithmetic in float32, on the CPU.
//
// A decode step of a few sequences is bound by reading the weights: on the 2-core
// Xeon every float32 weight of SmolLM2-135M (540 MB) streams from memory once per
// step at ~20 GB/s. Storing the weights in bfloat16 halves those bytes. Activations
// stay float32 and each weight is widened to float32 exactly (a bfloat16 is the top
// half of a float32), so the only change from a float32 GEMM is the weights'
// rounding to bfloat16.
//
// Layout: the weight is packed once as [ceil(N / 16), K, 16]: panel p holds outputs
// 16p..16p+15, and for each k their 16 weights are adjacent (32 bytes). The inner
// step widens one k-slice of a panel and multiplies it by x[r, k] broadcast, for
// every row r at once, so a weight is read once per call whatever the rows, and the
// accumulators (rows x panels of 16 floats) stay in registers.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "float_rows.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;     // outputs per panel: one 512-bit register of floats, two 256-bit ones

#if defined(__AVX512F__)

constexpr int64_t kMaxRows = 16;  // the largest batch the kernel takes

using coserve::load16;

// Rows [0, ROWS) of x times panels [p, p + PANELS), K deep; writes y's columns of those panels.
template <int ROWS, int PANELS>
void tile(const float* x, int64_t K, const at::BFloat16* w, int64_t p, const float* bias, float* y, int64_t N) {
  __m512 acc[ROWS][PANELS];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wk[PANELS];
    for (int j = 0; j < PANELS; ++j) wk[j] = load16(w + ((p + j) * K + k) * kPanel);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_fmadd_ps(wk[j], xr, acc[r][j]);
    }
  }
  for (int j = 0; j < PANELS; ++j) {
    const int64_t col = (p + j) * kPanel;
    const int64_t valid = std::min<int64_t>(kPanel, N - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) _mm512_mask_storeu_ps(y + r * N + col, mask, _mm512_add_ps(acc[r][j], b));
  }
}

// Two panels per tile while the accumulators fit the 32 registers (rows x 2 + 3).
template <int ROWS>
void run_rows(const float* x, int64_t K, const at::BFloat16* w, int64_t panels, const float* bias, float* y,
              int64_t N) {
  constexpr int kPanels = ROWS <= 12 ? 2 : 1;
  const int64_t tiles = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t * kPanels;
      if (p + kPanels <= panels) {
        tile<ROWS, kPanels>(x, K, w, p, bias, y, N);
      } else {
        tile<ROWS, 1>(x, K, w, p, bias, y, N);  // the odd last panel
      }
    }
  });
}

template <int... R>
void dispatch(int64_t rows, std::integer_sequence<int, R...>, const float* x, int64_t K, const at::BFloat16* w,
              int64_t panels, const float* bias, float* y, int64_t N) {
  ((rows == R + 1 ? (run_rows<R + 1>(x, K, w, panels, bias, y, N), 0) : 0), ...);
}

#elif defined(__AVX2__) && defined(__FMA__)

// AVX2: a panel's 16 outputs are two 256-bit registers of 8 floats, and 16 registers
// hold the accumulators. A tile therefore takes at most 6 rows (12 accumulators, two
// widened weights and a broadcast); a call of more rows runs its panel once per group
// of rows, the later groups reading the panel (K x 32 bytes: 18 KB at K = 576) from
// cache, not memory. One to three rows take two panels per tile so that enough
// chains of FMAs are in flight.

constexpr int kMaxGroup = 6;
constexpr int64_t kMaxRows = 128;  // the largest batch the kernel takes (see bf16_linear_max_rows)

// A panel's 16 bfloat16 weights of one k, widened to float32 exactly (a bfloat16 is
// the high half of a float32): interleaving zeros below them within each 128-bit lane
// takes one load and two shuffles, where zero-extending and shifting took four ops
// more. The lanes come out as outputs {0-3, 8-11} (lo) and {4-7, 12-15} (hi);
// `in_order` puts them back.
inline void load16_split(const at::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

// Outputs 0-7 (first) and 8-15 (second) from accumulators laid out as load16_split's.
inline void in_order(__m256 lo, __m256 hi, __m256& first, __m256& second) {
  first = _mm256_permute2f128_ps(lo, hi, 0x20);
  second = _mm256_permute2f128_ps(lo, hi, 0x31);
}

// Rows [0, ROWS) of x times panels [p, p + PANELS), K deep; writes y's columns of those panels.
template <int ROWS, int PANELS>
void tile(const float* x, int64_t K, const at::BFloat16* w, int64_t p, const float* bias, float* y, int64_t N) {
  __m256 acc[ROWS][PANELS][2];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < PANELS; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 2
    for (int j = 0; j < PANELS; ++j) {
      const at::BFloat16* wk = w + ((p + j) * K + k) * kPanel;
      __m256 lo, hi;
      load16_split(wk, lo, hi);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const __m256 xr = _mm256_broadcast_ss(x + r * K + k);
        acc[r][j][0] = _mm256_fmadd_ps(lo, xr, acc[r][j][0]);
        acc[r][j][1] = _mm256_fmadd_ps(hi, xr, acc[r][j][1]);
      }
    }
  }
  // The stores are masked to the outputs that exist, with no loop over them: a
  // runtime-length loop here kept the accumulators in memory, stored at every k.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 2
  for (int j = 0; j < PANELS; ++j) {
    const int64_t col = (p + j) * kPanel;
    const int valid = static_cast<int>(std::min<int64_t>(kPanel, N - col));
    const __m256i mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane);
    const __m256i mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid - 8), lane);
    const __m256 b_lo = bias ? _mm256_maskload_ps(bias + col, mask_lo) : _mm256_setzero_ps();
    const __m256 b_hi = bias ? _mm256_maskload_ps(bias + col + 8, mask_hi) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      __m256 first, second;
      in_order(acc[r][j][0], acc[r][j][1], first, second);
      _mm256_maskstore_ps(y + r * N + col, mask_lo, _mm256_add_ps(first, b_lo));
      _mm256_maskstore_ps(y + r * N + col + 8, mask_hi, _mm256_add_ps(second, b_hi));
    }
  }
}

template <int PANELS>
void group(int rows, const float* x, int64_t K, const at::BFloat16* w, int64_t p, const float* bias, float* y,
           int64_t N) {
  switch (rows) {
    case 1: return tile<1, PANELS>(x, K, w, p, bias, y, N);
    case 2: return tile<2, PANELS>(x, K, w, p, bias, y, N);
    case 3: return tile<3, PANELS>(x, K, w, p, bias, y, N);
    case 4: return tile<4, 1>(x, K, w, p, bias, y, N);
    case 5: return tile<5, 1>(x, K, w, p, bias, y, N);
    default: return tile<6, 1>(x, K, w, p, bias, y, N);
  }
}

void run(int64_t rows, const float* x, int64_t K, const at::BFloat16* w, int64_t panels, const float* bias, float* y,
         int64_t N) {
  // Groups of rows as even as possible: a group of two rows next to one of six would
  // keep too few FMA chains in flight, and take as long. Up to 3 rows, two panels per
  // tile (four panels for one row ran slower: 70 against 46 us at 576 x 1536).
  const int64_t groups = (rows + kMaxGroup - 1) / kMaxGroup;
  const int64_t per_tile = rows <= 3 ? 2 : 1;
  const int64_t tiles = (panels + per_tile - 1) / per_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t * per_tile;
      for (int64_t g = 0, r0 = 0; g < groups; ++g) {
        const int n = static_cast<int>((rows - r0) / (groups - g));
        if (per_tile == 2 && p + 2 <= panels) {
          group<2>(n, x + r0 * K, K, w, p, bias, y + r0 * N, N);
        } else {  // one panel: more rows, or an odd last panel
          group<1>(n, x + r0 * K, K, w, p, bias, y + r0 * N, N);
        }
        r0 += n;
      }
    }
  });
}

#else

constexpr int64_t kMaxRows = 0;  // no kernel in this build

#endif  // __AVX512F__, AVX2

bool bf16_linear_supported() {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  return true;
#else
  return false;
#endif
}

// The most rows a call may have: 16 with AVX-512, whose tiles hold all rows at once;
// 128 with AVX2, whose tiles take groups of rows, so that the engine's probe may
// measure it against the float32 GEMM up to a full decode batch (on the 2-core AMD
// EPYC, streaming a model's weights, it won from 1 to 64 rows and tied at 128, where
// both are bound by compute).
int64_t bf16_linear_max_rows() { return kMaxRows; }

void bf16_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs AVX-512 or AVX2 with FMA (this build has neither)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous(),
              "packed: contiguous bfloat16 [panels, K, 16]");
  const int64_t rows = x.size(0), K = x.size(1), panels = packed.size(0), N = out.size(1);
  TORCH_CHECK(packed.size(1) == K, "packed weight has K = ", packed.size(1), ", x has ", K);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "bf16_linear takes 1 to ", kMaxRows, " rows, got ", rows);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  (N + kPanel - 1) / kPanel == panels,
              "out: contiguous float32 [rows, N] with N matching the packed panels");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "bias: contiguous float32 [N]");
    b = bias->data_ptr<float>();
  }
#if defined(__AVX512F__)
  dispatch(rows, std::make_integer_sequence<int, kMaxRows>{}, x.data_ptr<float>(), K,
           packed.data_ptr<at::BFloat16>(), panels, b, out.data_ptr<float>(), N);
#elif defined(__AVX2__) && defined(__FMA__)
  run(rows, x.data_ptr<float>(), K, packed.data_ptr<at::BFloat16>(), panels, b, out.data_ptr<float>(), N);
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coserve, m) {
  m.def("bf16_linear_supported() -> bool", &bf16_linear_supported);
  m.def("bf16_linear_max_rows() -> int", &bf16_linear_max_rows);
  m.def("bf16_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
