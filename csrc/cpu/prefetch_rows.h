// Software prefetch of cached KV rows, for the decode attention kernels (AVX-512 and AVX2).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace coserve {

// Cached rows [begin, end) into L1, `lines` cache lines of each from its start (0: none).
// The rows of a sequence are scattered over its blocks and, within a block, strided
// by the kv heads: the hardware prefetchers lose the stream at every block, and the
// kernel waited on memory (8.6 GB/s of KV read at 64 sequences x 200 tokens, 30
// layers' caches in rotation, against ~21 GB/s the machine streams).
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* offsets, int64_t begin, int64_t end, int64_t lines) {
  for (int64_t t = begin; t < end; ++t) {
    const char* row = reinterpret_cast<const char*>(base + offsets[t]);
    for (int64_t l = 0; l < lines; ++l) _mm_prefetch(row + 64 * l, _MM_HINT_T0);
  }
}

}  // namespace coserve
