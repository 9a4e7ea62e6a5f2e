// A step's logits read once for what every step asks of them: per row, whether all its values are finite (a row
// that is not yields NONFINITE_TOKEN: engine/runner.py) and its greedy token, the index of its first maximum (the
// index torch.argmax gives).  Torch's isfinite(...).all(-1) and argmax(-1) are two passes of their own over a
// 49,152-wide row and took ~75 us each per row on 2 cores, 3% of a batch-1 decode step and more with proposals
// under verification, whose every position is scanned; this pass takes a few microseconds a row.
//
// Ties and signs as torch: values compare with <, so -0.0 and 0.0 tie and the earlier index wins.  A non-finite
// row's index is unspecified (its token is never used).
#include <cmath>
#include <cstdint>

#include "cpu_blocks.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// 16 lanes, each keeping its own first maximum and index; then the greatest value, and the least index holding it
int64_t scan_row(const float* x, int64_t V, bool& finite) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 bad = 0;
    for (int64_t j = 0; j < V; j += 16) {
        const __mmask16 in = disagg_blocks::lanes16(V - j);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, x + j);
        // v - v is 0 for a finite value, NaN for an infinity or a NaN
        bad |= in & ~_mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
        const __mmask16 gt = _mm512_cmp_ps_mask(best, v, _CMP_LT_OQ);
        best = _mm512_mask_mov_ps(best, gt, v);
        at = _mm512_mask_mov_epi32(at, gt, idx);
        idx = _mm512_add_epi32(idx, step);
    }
    finite = bad == 0;
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(tops, at);
}
#elif defined(__AVX2__)
int64_t scan_row(const float* x, int64_t V, bool& finite) {
    __m256 best = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    __m256i at = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    int64_t j = 0;
    for (; j + 8 <= V; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        const __m256 gt = _mm256_cmp_ps(best, v, _CMP_LT_OQ);
        best = _mm256_blendv_ps(best, v, gt);
        at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
        idx = _mm256_add_epi32(idx, step);
    }
    alignas(32) float vals[8];
    alignas(32) int32_t ats[8];
    _mm256_store_ps(vals, best);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ats), at);
    finite = _mm256_movemask_ps(bad) == 0;
    float top = -INFINITY;
    int64_t arg = 0;
    for (int l = 0; l < 8; ++l)  // the lanes' maxima, each its lane's first: the least index among the greatest
        if (top < vals[l] || (vals[l] == top && ats[l] < arg)) top = vals[l], arg = ats[l];
    for (; j < V; ++j) {
        finite = finite && std::isfinite(x[j]);
        if (top < x[j]) top = x[j], arg = j;
    }
    return arg;
}
#else
int64_t scan_row(const float* x, int64_t V, bool& finite) {
    float top = -INFINITY;
    int64_t arg = 0;
    finite = true;
    for (int64_t j = 0; j < V; ++j) {
        finite = finite && std::isfinite(x[j]);
        if (top < x[j]) top = x[j], arg = j;
    }
    return arg;
}
#endif

// rows that pay for a fork and join (a row is a few microseconds)
constexpr int64_t SPLIT_ROWS = 4;

}  // namespace

extern "C" {

// x [B, V] float32: argmax[b] the index of row b's first maximum, finite[b] 1 when every value of the row is finite
void disagg_logits_scan(const float* x, int64_t B, int64_t V, int64_t* argmax, uint8_t* finite, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (B >= SPLIT_ROWS)
    for (int64_t b = 0; b < B; ++b) {
        bool ok = true;
        argmax[b] = scan_row(x + b * V, V, ok);
        finite[b] = ok ? 1 : 0;
    }
}

}  // extern "C"
