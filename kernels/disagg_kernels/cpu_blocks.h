// What the block kernels of this package agree on (cpu_quant.cpp, cpu_dot8.cpp, cpu_gemm8.cpp): the block of 32
// weights, its code formats, a block's minimum, and how a block of activations is rounded to integers.  In one
// place because "w = d q + m" across the three kernels, and "the same integers" across the row kernel (cpu_dot8.cpp)
// and the blocked GEMM (cpu_gemm8.cpp), rest on these being identical.  The build key of the library
// (native_build.py) covers this header with the sources.
#pragma once
#include <cmath>
#include <cstdint>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace disagg_blocks {

constexpr int64_t QK = 32;  // weights (and activations) per block
enum Codes { NIB = 0, S8 = 1, U8 = 2, F32 = 3 };
constexpr int64_t block_bytes(int c) { return c == NIB ? QK / 2 : c == F32 ? QK * 4 : QK; }

// a weight block's minimum m in w = d q + m: its own (Q4_1, U8), -8 d (Q4_0, called without mins), none (Q8_0)
template <int C>
inline float block_min(const float* mrow, int64_t b, float db) {
    return mrow ? mrow[b] : (C == NIB ? -8.0f * db : 0.0f);
}

// 32 activations rounded to integers of L levels (127: int8, 32767: int16): dx = amax / L, q = round(x / dx),
// sx = dx * sum(q).  Code j goes to q[at(j)], the caller's layout.
template <typename A, typename At>
inline void round_block(const float* x, A* q, At at, float& dx, float& sx) {
    constexpr float levels = sizeof(A) == 1 ? 127.0f : 32767.0f;
    float amax = 0.0f;  // std::fmax's result (a NaN skipped) without its library call: 2% of a long prefill
    for (int j = 0; j < QK; ++j) {
        const float a = std::fabs(x[j]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / levels, inv = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
        const int v = static_cast<int>(std::nearbyint(x[j] * inv));
        q[at(j)] = static_cast<A>(v);
        sum += v;
    }
    dx = d;
    sx = d * static_cast<float>(sum);
}

// The cache lines of [base + offset, base + offset + bytes) asked for ahead of their use.  The kernels
// read their weights in order, yet the hardware prefetcher alone left a batch-1 pass waiting on memory, at about
// half the bandwidth a plain read reaches (docs/benchmarks.md, "Weights fetched ahead").  The row-layout kernels
// (cpu_quant.cpp, cpu_dot8.cpp) ask for the block row PREFETCH_ROWS ahead of the one they compute (2 gained half
// of what 4 did); the panel kernel counts in its own blocks.
constexpr int64_t PREFETCH_ROWS = 4;

inline void fetch_ahead(const void* base, int64_t offset, int64_t bytes) {
#if defined(__SSE__)
    // in integers: the address may lie past the allocation (a prefetch never faults; a pointer there is undefined)
    const uintptr_t first = (reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset)) & ~uintptr_t{63};
    const uintptr_t end = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset + bytes);
    for (uintptr_t line = first; line < end; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
#else
    (void)base, (void)offset, (void)bytes;
#endif
}

#if defined(__AVX512F__)
// the first min(left, 16) of 16 lanes: a loop's last, partial vector (left <= 0: none)
inline __mmask16 lanes16(int64_t left) {
    return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}
#endif

}  // namespace disagg_blocks
