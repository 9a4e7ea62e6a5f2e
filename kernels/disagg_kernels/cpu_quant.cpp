// Block-quantized matmuls on CPU: y[B, N] = x[B, K] @ W^T, W stored in blocks of 32 weights along K.
//
// Codes of a block, and what they stand for (scales and mins are unpacked to float32 arrays at load):
//   NIB (Q4_1): w = d * q + m, q in 0..15; 16 bytes: byte j holds q[j] (low nibble) and q[j + 16] (high), as GGUF
//   NIB (Q4_0): w = d * (q - 8): called with m = NULL, the kernel uses m = -8 d
//   S8  (Q8_0): w = d * q, q int8; 32 bytes
//   U8  (int8 rounding of float checkpoints): w = d * q + m, q in 0..255; 32 bytes
//   F32 (a float32 model's own matrices): w = q, 128 bytes; d is 1 and m NULL, so w = d q + m holds exactly
// Activations and accumulation are float32, so results differ from a float32 GEMM over the de-quantized weights
// only by summation order.  A block is de-quantized in registers (w = d q + m, one FMA per vector) and used by
// ROWS rows of x before the next block is read: batch-1 decode is bound by the bytes of W read, wider batches by
// the FMAs.
//
// Built at start-up with -march=native (cpu_quant.py): the AVX-512 or AVX2 path below is chosen by what the
// running CPU has, with a portable loop for anything else.  The OpenMP runtime is the one torch has loaded.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_blocks.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace disagg_blocks;

template <int C>
inline float code(const uint8_t* q, int j) {  // code j of a block, as a float
    if constexpr (C == NIB) return static_cast<float>(j < 16 ? (q[j] & 0x0F) : (q[j - 16] >> 4));
    if constexpr (C == S8) return static_cast<float>(reinterpret_cast<const int8_t*>(q)[j]);
    if constexpr (C == F32) return reinterpret_cast<const float*>(q)[j];
    return static_cast<float>(q[j]);
}

#if defined(__AVX512F__)
constexpr int64_t ROWS = 8;
// the 32 codes of one block as two float vectors (elements 0..15 and 16..31)
template <int C>
inline void codes(const uint8_t* q, __m512& lo, __m512& hi) {
    const __m128i* p = reinterpret_cast<const __m128i*>(q);
    if constexpr (C == F32) {
        lo = _mm512_loadu_ps(reinterpret_cast<const float*>(q));
        hi = _mm512_loadu_ps(reinterpret_cast<const float*>(q) + 16);
    } else if constexpr (C == S8) {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
    } else if constexpr (C == U8) {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p + 1)));
    } else {
        const __m128i b = _mm_loadu_si128(p);
        const __m128i mask = _mm_set1_epi8(0x0F);
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
    }
}

// one block's 32 weights (w = d q + m) in two registers
template <int C>
inline void weights(const uint8_t* q, float db, float mb, __m512& lo, __m512& hi) {
    codes<C>(q, lo, hi);
    const __m512 d = _mm512_set1_ps(db), m = _mm512_set1_ps(mb);
    lo = _mm512_fmadd_ps(lo, d, m);
    hi = _mm512_fmadd_ps(hi, d, m);
}

// out[r] = x_r . w for `rows` <= ROWS rows of x; each block is de-quantized once (w = d q + m) and used by all rows
template <int C>
inline void dot_rows(const float* x, int64_t K, int64_t rows, const uint8_t* qrow, const float* drow,
                     const float* mrow, int64_t nb, float* out) {
    __m512 acc_lo[ROWS], acc_hi[ROWS];
    for (int64_t r = 0; r < ROWS; ++r) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m512 lo, hi;
        weights<C>(qrow + b * block_bytes(C), drow[b], block_min<C>(mrow, b, drow[b]), lo, hi);
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = x + r * K + b * QK;
            acc_lo[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo, acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), hi, acc_hi[r]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
}

// one block's 32 weights, de-quantized into out
template <int C>
inline void decode_block(const uint8_t* q, float db, float mb, float* out) {
    __m512 lo, hi;
    weights<C>(q, db, mb, lo, hi);
    _mm512_storeu_ps(out, lo);
    _mm512_storeu_ps(out + 16, hi);
}
#elif defined(__AVX2__)
constexpr int64_t ROWS = 4;
template <int C>
inline __m256 codes8(const uint8_t* q, int part) {  // codes 8 * part .. 8 * part + 7 of a block
    if constexpr (C == F32) {
        return _mm256_loadu_ps(reinterpret_cast<const float*>(q) + 8 * part);
    } else if constexpr (C == NIB) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * (part & 1)));
        const __m128i nib = part < 2 ? b : _mm_srli_epi16(b, 4);
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(nib, _mm_set1_epi8(0x0F))));
    } else {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * part));
        return _mm256_cvtepi32_ps(C == S8 ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
    }
}

template <int C>
inline void dot_rows(const float* x, int64_t K, int64_t rows, const uint8_t* qrow, const float* drow,
                     const float* mrow, int64_t nb, float* out) {
    __m256 acc_a[ROWS], acc_b[ROWS];  // two chains per row: elements 0..7 + 16..23 and 8..15 + 24..31
    for (int64_t r = 0; r < ROWS; ++r) acc_a[r] = acc_b[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* q = qrow + b * block_bytes(C);
        const __m256 db = _mm256_set1_ps(drow[b]), mb = _mm256_set1_ps(block_min<C>(mrow, b, drow[b]));
        const __m256 w0 = _mm256_fmadd_ps(codes8<C>(q, 0), db, mb), w1 = _mm256_fmadd_ps(codes8<C>(q, 1), db, mb);
        const __m256 w2 = _mm256_fmadd_ps(codes8<C>(q, 2), db, mb), w3 = _mm256_fmadd_ps(codes8<C>(q, 3), db, mb);
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = x + r * K + b * QK;
            acc_a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc_a[r]);
            acc_b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc_b[r]);
            acc_a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, acc_a[r]);
            acc_b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, acc_b[r]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        const __m256 acc = _mm256_add_ps(acc_a[r], acc_b[r]);
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        const __m128 s = _mm_add_ps(h, _mm_movehl_ps(h, h));
        out[r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
    }
}

template <int C>
inline void decode_block(const uint8_t* q, float db, float mb, float* out) {
    const __m256 d = _mm256_set1_ps(db), m = _mm256_set1_ps(mb);
    for (int p = 0; p < 4; ++p) _mm256_storeu_ps(out + 8 * p, _mm256_fmadd_ps(codes8<C>(q, p), d, m));
}
#else
constexpr int64_t ROWS = 4;
template <int C>
inline void decode_block(const uint8_t* q, float db, float mb, float* out) {
    for (int j = 0; j < QK; ++j) out[j] = db * code<C>(q, j) + mb;
}

template <int C>
inline void dot_rows(const float* x, int64_t K, int64_t rows, const uint8_t* qrow, const float* drow,
                     const float* mrow, int64_t nb, float* out) {
    float w[QK];
    for (int64_t r = 0; r < rows; ++r) out[r] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        decode_block<C>(qrow + b * block_bytes(C), drow[b], block_min<C>(mrow, b, drow[b]), w);
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = x + r * K + b * QK;
            for (int j = 0; j < QK; ++j) out[r] += xr[j] * w[j];
        }
    }
}

#endif

template <int C>
void matmul(const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
            float* y, int threads) {
    const int64_t nb = K / QK;
    const int64_t row_bytes = nb * block_bytes(C);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qrow = qs + n * row_bytes;
        const float* drow = d + n * nb;
        const float* mrow = m ? m + n * nb : nullptr;
        // rows are read in order: ask for the next ones' blocks.  Not float32 rows (a float32 model's native
        // step): long enough for the hardware prefetcher, they were slower when asked for (docs/benchmarks.md)
        if constexpr (C != F32) {
            fetch_ahead(qrow, PREFETCH_ROWS * row_bytes, row_bytes);
            fetch_ahead(drow, PREFETCH_ROWS * nb * 4, nb * 4);
            if (mrow) fetch_ahead(mrow, PREFETCH_ROWS * nb * 4, nb * 4);
        }
        for (int64_t r0 = 0; r0 < B; r0 += ROWS) {
            const int64_t rows = B - r0 < ROWS ? B - r0 : ROWS;
            float out[ROWS];
            dot_rows<C>(x + r0 * K, K, rows, qrow, drow, mrow, nb, out);
            for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * N + n] = out[r];
        }
    }
}

template <int C>
void dequantize(const uint8_t* qs, const float* d, const float* m, int64_t N, int64_t K, float* out, int threads) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* q = qs + (n * nb + b) * block_bytes(C);
            const float db = d[n * nb + b];
            decode_block<C>(q, db, block_min<C>(m ? m + n * nb : nullptr, b, db), out + n * K + b * QK);
        }
    }
}

}  // namespace

extern "C" {

// codes: 0 four-bit (Q4_0 / Q4_1), 1 int8 (Q8_0), 2 uint8 with a min, 3 float32 weights as they are (d = 1, no
// m: a float32 model's matrices in the native step); m may be NULL (Q4_0, Q8_0, float32)
void disagg_quant_matmul(int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d,
                         const float* m, int64_t N, float* y, int threads) {
    if (codes == NIB) matmul<NIB>(x, B, K, qs, d, m, N, y, threads);
    else if (codes == S8) matmul<S8>(x, B, K, qs, d, m, N, y, threads);
    else if (codes == F32) matmul<F32>(x, B, K, qs, d, m, N, y, threads);
    else matmul<U8>(x, B, K, qs, d, m, N, y, threads);
}

void disagg_quant_dequantize(int codes, const uint8_t* qs, const float* d, const float* m, int64_t N, int64_t K,
                             float* out, int threads) {
    if (codes == NIB) dequantize<NIB>(qs, d, m, N, K, out, threads);
    else if (codes == S8) dequantize<S8>(qs, d, m, N, K, out, threads);
    else if (codes == F32) dequantize<F32>(qs, d, m, N, K, out, threads);
    else dequantize<U8>(qs, d, m, N, K, out, threads);
}

// The vector ISA this build targets (what -march=native found on this CPU).
const char* disagg_quant_isa() {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "portable";
#endif
}

}  // extern "C"
