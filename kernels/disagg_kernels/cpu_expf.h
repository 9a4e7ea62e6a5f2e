// expf, 16 floats at a time on AVX-512 (8 on AVX2), with the bits of the C library's scalar expf (glibc 2.28 and later).
//
// Why its bits: the native step's attention and SiLU took one scalar `std::exp` call per score and per gate value
// (a 1,500-token prompt: ~300 million calls over its layers), and their outputs are held to be the same bits
// whatever a step holds and from one build to the next (the batch invariance an int8 KV cache needs, and the
// bit-for-bit checks against the previous kernel).  A vector exp of our own choosing would move every
// probability by up to an ulp: the teacher-forced agreement of int8 activations sits near its 97% bar, and moved
// under it when a softmax's summation order was changed (docs/benchmarks.md).
//
// The algorithm is glibc's expf (from Arm's optimized routines): x N / ln 2 = k + r with N = 32, exp(x) =
// 2^(k / N) * 2^(r / N), the first from a 32-entry table with k / N's integer part added to the exponent bits, the
// second a cubic in r; all in double precision, rounded to float once.  The operations are those of glibc's FMA
// variant (the one its resolver picks on every CPU with AVX2 and FMA, so on every CPU this path is built for),
// fused as it fuses them, in the same order; the constants are its own.  Out-of-range inputs take its special
// cases: below log(2^-150) 0, below log(2^-149) the least subnormal, above log(2^128) infinity, NaN as x + x.
// tests/test_native_expf.py holds it to the library's expf over sampled ranges; over every float it was checked
// once by hand (docs/benchmarks.md).
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu_blocks.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>

namespace disagg_expf {

// 2^(i / 32) as a double's bits, less i << 47, so that adding k << 47 (k's low 5 bits select i) sets the exponent
alignas(64) inline constexpr int64_t TABLE[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
};
constexpr double INV_LN2_N = 0x1.71547652b82fep+5;  // 32 / ln 2
constexpr double SHIFT = 0x1.8p+52;  // adding it rounds to an integer, kept in the low bits
constexpr double C0 = 0x1.c6af84b912394p-20, C1 = 0x1.ebfce50fac4f3p-13, C2 = 0x1.62e42ff0c52d6p-6;
constexpr float OVERFLOW_ABOVE = 0x1.62e42ep6f, ZERO_BELOW = -0x1.9fe368p6f, LEAST_BELOW = -0x1.9d1d9ep6f;

#if defined(__AVX512F__)
inline __m512d exp8d(__m512d xd) {  // 8 lanes of float inputs widened to double; the double before rounding
    const __m512d inv = _mm512_set1_pd(INV_LN2_N), shift = _mm512_set1_pd(SHIFT);
    __m512d kd = _mm512_fmadd_pd(inv, xd, shift);
    const __m512i ki = _mm512_castpd_si512(kd);
    kd = _mm512_sub_pd(kd, shift);
    const __m512d r = _mm512_fmsub_pd(inv, xd, kd);
    const __m512d z = _mm512_fmadd_pd(r, _mm512_set1_pd(C0), _mm512_set1_pd(C1));
    // TABLE[ki & 31]: entries 0-15 from the first pair of vectors, 16-31 from the second, by bit 4
    const __m512i* t = reinterpret_cast<const __m512i*>(TABLE);
    const __m512i low = _mm512_permutex2var_epi64(_mm512_load_si512(t), ki, _mm512_load_si512(t + 1));
    const __m512i high = _mm512_permutex2var_epi64(_mm512_load_si512(t + 2), ki, _mm512_load_si512(t + 3));
    const __mmask8 upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
    const __m512i bits = _mm512_add_epi64(_mm512_mask_blend_epi64(upper, low, high), _mm512_slli_epi64(ki, 47));
    const __m512d r2 = _mm512_mul_pd(r, r);
    __m512d y = _mm512_fmadd_pd(r, _mm512_set1_pd(C2), _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(z, r2, y);
    return _mm512_mul_pd(y, _mm512_castsi512_pd(bits));
}

inline __m512 exp16(__m512 x) {
    const __m256 lo = _mm512_cvtpd_ps(exp8d(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
    const __m256 hi = _mm512_cvtpd_ps(
        exp8d(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))));
    __m512 y = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                                    _mm256_castps_pd(hi), 1));
    // the library's special cases, the later overriding the earlier as its tests come first
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(LEAST_BELOW), _CMP_LT_OQ),
                           _mm512_set1_ps(0x1p-149f));
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(ZERO_BELOW), _CMP_LT_OQ), _mm512_setzero_ps());
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(OVERFLOW_ABOVE), _CMP_GT_OQ),
                           _mm512_set1_ps(INFINITY));
    return _mm512_mask_add_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x, x);
}
#else
inline __m256d exp4d(__m256d xd) {  // exp8d above, 4 lanes: the same operations in the same order
    const __m256d inv = _mm256_set1_pd(INV_LN2_N), shift = _mm256_set1_pd(SHIFT);
    __m256d kd = _mm256_fmadd_pd(inv, xd, shift);
    const __m256i ki = _mm256_castpd_si256(kd);
    kd = _mm256_sub_pd(kd, shift);
    const __m256d r = _mm256_fmsub_pd(inv, xd, kd);
    const __m256d z = _mm256_fmadd_pd(r, _mm256_set1_pd(C0), _mm256_set1_pd(C1));
    const __m256i index = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
    const __m256i entry = _mm256_i64gather_epi64(reinterpret_cast<const long long*>(TABLE), index, 8);
    const __m256i bits = _mm256_add_epi64(entry, _mm256_slli_epi64(ki, 47));
    const __m256d r2 = _mm256_mul_pd(r, r);
    __m256d y = _mm256_fmadd_pd(r, _mm256_set1_pd(C2), _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(z, r2, y);
    return _mm256_mul_pd(y, _mm256_castsi256_pd(bits));
}

inline __m256 exp8(__m256 x) {  // exp16 above, 8 lanes
    const __m128 lo = _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_castps256_ps128(x))));
    const __m128 hi = _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
    __m256 y = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(0x1p-149f), _mm256_cmp_ps(x, _mm256_set1_ps(LEAST_BELOW), _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(ZERO_BELOW), _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(OVERFLOW_ABOVE), _CMP_GT_OQ));
    return _mm256_blendv_ps(y, _mm256_add_ps(x, x), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

// e[j] = exp(e[j] - m) for j < n: the step's exponentials, vector lanes with the library's bits where built
inline void exp_shifted(float* e, int64_t n, float m) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j < n; j += 16) {
        const __mmask16 in = disagg_blocks::lanes16(n - j);
        _mm512_mask_storeu_ps(e + j, in, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, e + j), _mm512_set1_ps(m))));
    }
#else
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(e + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(e + j), _mm256_set1_ps(m))));
    for (; j < n; ++j) e[j] = std::exp(e[j] - m);
#endif
}

}  // namespace disagg_expf
#else
namespace disagg_expf {
inline void exp_shifted(float* e, int64_t n, float m) {
    for (int64_t j = 0; j < n; ++j) e[j] = std::exp(e[j] - m);
}
}  // namespace disagg_expf
#endif

namespace disagg_expf {
// out[i] = silu(g[i]) * up[i] for i < m <= 16: g / (1 + exp(-g)) * up, the native step's SiLU, its exponentials
// in vector lanes (the library's bits)
inline void silu_times(const float* g, const float* up, int64_t m, float* out) {
#if defined(__AVX512F__)
    const __mmask16 in = disagg_blocks::lanes16(m);
    const __m512 x = _mm512_maskz_loadu_ps(in, g);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out, in, _mm512_mul_ps(y, _mm512_maskz_loadu_ps(in, up)));
#else
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= m; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        const __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < m; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * up[i];
#endif
}
}  // namespace disagg_expf
