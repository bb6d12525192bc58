// Residual add and RMSNorm in one pass, on the CPU: a float32 residual stream, a
// float32 or bfloat16 compute type.
//
// Each decoder layer adds its attention output to the residual stream, normalises the
// sum for the MLP, then adds the MLP output and normalises again for the next layer.
// Natively that is an add plus the five-op decomposition of rms_norm (pow, mean, add,
// rsqrt, mul) and the weight multiply: at decode batch sizes each op costs more in
// dispatch than in arithmetic, about 4 ms of a 40 ms SmolLM2-135M decode step on the
// 2-core Xeon. Here one call reads each row once, updates the residual in place and
// writes the normalised row.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "float_rows.h"

namespace {

// Rows per parallel work item: a decode batch (<= 16 rows of ~1k floats) is done by
// one thread before a second one could start; long prefill batches split.
constexpr int64_t kRowsPerTask = 32;

template <typename T>
void run(float* r, const T* d, const T* w, T* y, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    // bfloat16 rows go through float32 buffers (float_rows.h); float32 ones are used in place.
    std::vector<float> weight(hidden), buffer(hidden);
    coserve::to_float(w, weight.data(), hidden);
    const float* wf = weight.data();
    float* b = buffer.data();
    for (int64_t row = begin; row < end; ++row) {
      float* x = r + row * hidden;
      if (d != nullptr) {
        const float* dx = b;
        if constexpr (std::is_same_v<T, float>) {
          dx = d + row * hidden;
        } else {
          coserve::to_float(d + row * hidden, b, hidden);
        }
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) x[i] += dx[i];
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += x[i] * x[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) b[i] = x[i] * inv;
      if constexpr (std::is_same_v<T, float>) {
        float* yr = y + row * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) yr[i] = wf[i] * b[i];
      } else {
        // Rounded to T before the weight multiply, as the native RMSNorm does.
        T* yr = y + row * hidden;
        coserve::from_float(b, yr, hidden);
        coserve::to_float(yr, b, hidden);
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) b[i] *= wf[i];
        coserve::from_float(b, yr, hidden);
      }
    }
  });
}

// residual: [rows, hidden] float32, becomes residual + delta when delta is given.
// out: [rows, hidden] = weight * residual / sqrt(mean(residual^2) + eps), in the compute
// type T (float32 or bfloat16) that delta, weight and out share; the residual stream
// stays float32 whatever T is.
void add_rms_norm(at::Tensor& out, at::Tensor& residual, const c10::optional<at::Tensor>& delta,
                  const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.dim() == 2 && residual.scalar_type() == at::kFloat && residual.is_contiguous(),
              "residual: contiguous float32 [rows, hidden]");
  const auto type = weight.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, "weight: float32 or bfloat16");
  TORCH_CHECK(out.sizes() == residual.sizes() && out.scalar_type() == type && out.is_contiguous(),
              "out: contiguous, the shape of residual, the type of weight");
  const int64_t rows = residual.size(0), hidden = residual.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous(), "weight: contiguous [hidden]");
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == residual.sizes() && delta->scalar_type() == type && delta->is_contiguous(),
                "delta: contiguous, the shape of residual, the type of weight");
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type, "add_rms_norm", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      const scalar_t* d = delta.has_value() ? delta->data_ptr<scalar_t>() : nullptr;
      run<scalar_t>(residual.data_ptr<float>(), d, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                    hidden, static_cast<float>(eps));
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coserve, m) {
  m.def("add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor? delta, Tensor weight, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(coserve, CPU, m) { m.impl("add_rms_norm", &add_rms_norm); }
