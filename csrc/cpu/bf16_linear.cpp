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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;     // outputs per panel: one 512-bit register of floats
constexpr int64_t kMaxRows = 16;   // the largest batch the kernel takes

#if defined(__AVX512F__)

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

#endif  // __AVX512F__

bool bf16_linear_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

void bf16_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs AVX-512 (this build has none)");
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
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coserve, m) {
  m.def("bf16_linear_supported() -> bool", &bf16_linear_supported);
  m.def("bf16_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
