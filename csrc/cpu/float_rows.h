// Rows of float32 or bfloat16 values moved to and from float32 scratch buffers.
//
// The elementwise kernels compute in float32 over a row at a time. Written directly over
// c10::BFloat16 values their loops did not vectorise (each conversion is a call with a
// NaN branch), and a bfloat16 model's norms and activations ran several times slower
// than float32's. Converting a row into a float32 buffer first (AVX-512 where built
// for it) leaves plain float loops that the compiler vectorises.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace coserve {

#if defined(__AVX512F__)
// 16 values as float32, exactly: a bfloat16 is the high half of a float32, so it is
// zero-extended and shifted into place.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Rounds to nearest even, as c10's conversion does for finite values (NaN stays NaN).
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(src + i);
      const __m512i bits = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
      __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(bias, lsb)), 16);
      // NaN: keep a quiet NaN instead of letting the rounding carry into the exponent.
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(rounded));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

}  // namespace coserve
