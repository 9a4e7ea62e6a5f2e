// Block matmuls with integer activations (`--quant-activations int8 | int16`): y[B, N] = x[B, K] @ W^T, as
// llama.cpp computes a Q4_1 x Q8_1 dot.  Each row of x is rounded per block of 32 (dx = amax / L, qx = round(x /
// dx), sx = dx * sum(qx); L = 127 for int8, 32767 for int16); then per weight block (w = d q + m, cpu_quant.cpp's
// codes)
//     x . w  ~=  d * dx * (q . qx)  +  m * sx
// with q . qx an integer dot product: AVX-512 VNNI `vpdpbusd` (int8: 64 byte products an instruction) or
// `vpdpwssd` (int16: 32 word products), or a portable loop.  int8 rounds each activation by up to 0.4% of its
// block's largest (lossy, as llama.cpp); int16 by 0.0015% (float32 summation error is of that order).
//
// Layout: x's codes are stored two blocks at a time as [b0[0:16], b1[0:16], b0[16:32], b1[16:32]], the order a
// 4-bit pair of blocks unpacks to (low nibbles of both, then high nibbles), so registers of codes and of
// activations line up; 8-bit codes are put in that order with one lane shuffle.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu_blocks.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DISAGG_VNNI 1
#else
#define DISAGG_VNNI 0
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#endif

namespace {

using namespace disagg_blocks;

template <typename A>
struct Row {  // one row of x, rounded
    const A* q;  // K codes, pair-interleaved
    const float* dx;  // [nb] scales
    const float* sx;  // [nb] dx * sum of the block's codes
};

// where element j of block b lives in the pair-interleaved layout
inline int64_t slot(int64_t b, int64_t j, int64_t nb) {
    if ((b | 1) >= nb) return b * QK + j;  // a last, unpaired block stays as it is
    return (b & ~int64_t{1}) * QK + (j < 16 ? 0 : 32) + (b & 1) * 16 + (j & 15);
}

template <typename A>
void round_row(const float* x, int64_t K, A* q, float* dx, float* sx) {
    const int64_t nb = K / QK;
    for (int64_t b = 0; b < nb; ++b)
        round_block(x + b * QK, q, [b, nb](int j) { return slot(b, j, nb); }, dx[b], sx[b]);
}

template <int C>
inline int code(const uint8_t* q, int j) {
    if constexpr (C == NIB) return j < 16 ? (q[j] & 0x0F) : (q[j - 16] >> 4);
    if constexpr (C == S8) return reinterpret_cast<const int8_t*>(q)[j];
    return q[j];
}

// sum over blocks b0 <= b < b1 of d[b] dx[b] (q . qx)_b, one block at a time (the unpaired tail; portable path)
template <int C, typename A>
float dot_blocks(const uint8_t* qrow, const float* drow, const Row<A>& x, int64_t b0, int64_t b1, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* q = qrow + b * block_bytes(C);
        int64_t s = 0;
        for (int j = 0; j < QK; ++j) s += code<C>(q, j) * x.q[slot(b, j, nb)];
        acc += drow[b] * x.dx[b] * static_cast<float>(s);
    }
    return acc;
}

#if DISAGG_VNNI
// 64 codes of blocks b, b + 1 as unsigned bytes in the pair layout
template <int C>
inline __m512i pair_codes(const uint8_t* q) {
    if constexpr (C == NIB) {
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));  // 16 bytes each block
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(t, mask), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), mask);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    } else {
        const __m512i t = _mm512_loadu_si512(q);  // 32 bytes each block
        return _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(3, 1, 2, 0));
    }
}

// the two blocks' scales d * dx as a vector whose lanes follow `lanes` (0: block b, 1: block b + 1)
inline __m512 pair_scale(__m128 dw2, const float* dx, int64_t b, __m512i lanes) {
    const __m128 s2 = _mm_mul_ps(dw2, _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(dx + b))));
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s2));
}

constexpr int64_t ROWS = 4;  // rows of x per pass over a weight row: each pair of blocks is unpacked once for them

// out[r] = sum over paired blocks of d dx (q . qx) for `rows` <= ROWS rows of x.  int8: `vpdpbusd` on the pair's 64
// codes (lanes 0-3 and 8-11 sum block b, the others b + 1); int16: the codes widened to 16 bits, two `vpdpwssd`
// (lanes 0-7 block b, 8-15 b + 1)
template <int C, typename A, int64_t R>  // R rows, known at compile time: the accumulators stay in registers
void dot_pairs_n(const uint8_t* qrow, const float* drow, const Row<A>* xs, int64_t nb, float* out) {
    const __m512i lanes = sizeof(A) == 1 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                         : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[R];
    for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t b = 0; b + 1 < nb; b += 2) {
        const uint8_t* q = qrow + b * block_bytes(C);
        const __m128 dw2 = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(drow + b)));
        if constexpr (sizeof(A) == 1) {
            __m512i w = pair_codes<C>(q);
            __mmask64 neg = 0;
            if constexpr (C == S8) {  // vpdpbusd multiplies unsigned by signed: |w| by x with w's sign
                neg = _mm512_movepi8_mask(w);
                w = _mm512_abs_epi8(w);
            }
            for (int64_t r = 0; r < R; ++r) {
                __m512i a = _mm512_loadu_si512(xs[r].q + b * QK);
                if constexpr (C == S8) a = _mm512_mask_sub_epi8(a, neg, zero, a);
                const __m512i dot = _mm512_dpbusd_epi32(zero, w, a);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair_scale(dw2, xs[r].dx, b, lanes), acc[r]);
            }
        } else {
            __m256i lo, hi;  // [b0 0:16, b1 0:16] and [b0 16:32, b1 16:32] as bytes
            if constexpr (C == NIB) {
                const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
                const __m256i mask = _mm256_set1_epi8(0x0F);
                lo = _mm256_and_si256(t, mask);
                hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), mask);
            } else {
                const __m512i t = pair_codes<C>(q);
                lo = _mm512_castsi512_si256(t);
                hi = _mm512_extracti64x4_epi64(t, 1);
            }
            const __m512i wlo = C == S8 ? _mm512_cvtepi8_epi16(lo) : _mm512_cvtepu8_epi16(lo);
            const __m512i whi = C == S8 ? _mm512_cvtepi8_epi16(hi) : _mm512_cvtepu8_epi16(hi);
            for (int64_t r = 0; r < R; ++r) {
                const A* xq = xs[r].q + b * QK;
                __m512i dot = _mm512_dpwssd_epi32(zero, wlo, _mm512_loadu_si512(xq));
                dot = _mm512_dpwssd_epi32(dot, whi, _mm512_loadu_si512(xq + 32));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair_scale(dw2, xs[r].dx, b, lanes), acc[r]);
            }
        }
    }
    for (int64_t r = 0; r < R; ++r)
        out[r] = _mm512_reduce_add_ps(acc[r]) + dot_blocks<C>(qrow, drow, xs[r], nb & ~int64_t{1}, nb, nb);
}

template <int C, typename A>
void dot_pairs(const uint8_t* qrow, const float* drow, const Row<A>* xs, int64_t rows, int64_t nb, float* out) {
    if (rows == 4) dot_pairs_n<C, A, 4>(qrow, drow, xs, nb, out);
    else if (rows == 3) dot_pairs_n<C, A, 3>(qrow, drow, xs, nb, out);
    else if (rows == 2) dot_pairs_n<C, A, 2>(qrow, drow, xs, nb, out);
    else dot_pairs_n<C, A, 1>(qrow, drow, xs, nb, out);
}

#elif defined(__AVX2__)
// AVX2 without VNNI: one block at a time; `vpmaddwd` (16-bit products summed in pairs) for int16 activations and
// for 8-bit codes, `vpmaddubsw` for 4-bit codes by int8 (15 * 127 * 2 fits its 16-bit sums; 255 * 127 * 2 would
// not, so 8-bit codes widen to 16 bits).
template <int C>
inline __m256i codes16(const uint8_t* q, int part) {  // codes 16 * part .. 16 * part + 15 of a block, as int16
    if constexpr (C == NIB) {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m128i nib = _mm_and_si128(part ? _mm_srli_epi16(t, 4) : t, _mm_set1_epi8(0x0F));
        return _mm256_cvtepu8_epi16(nib);
    } else {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * part));
        return C == S8 ? _mm256_cvtepi8_epi16(t) : _mm256_cvtepu8_epi16(t);
    }
}

template <typename A>
inline __m256i acts16(const A* q, int64_t b, int part, int64_t nb) {  // activations 16 * part .. of block b
    const A* p = q + slot(b, 16 * part, nb);
    if constexpr (sizeof(A) == 2) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    else return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int C, typename A>
inline __m256i block_dot(const uint8_t* q, const A* xq, int64_t b, int64_t nb) {  // 8 int32 lanes summing to q.qx
    if constexpr (C == NIB && sizeof(A) == 1) {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), mask), _mm_and_si128(t, mask));
        const __m256i a = _mm256_set_m128i(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + slot(b, 16, nb))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + slot(b, 0, nb))));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
    } else {
        const __m256i lo = _mm256_madd_epi16(codes16<C>(q, 0), acts16(xq, b, 0, nb));
        return _mm256_add_epi32(lo, _mm256_madd_epi16(codes16<C>(q, 1), acts16(xq, b, 1, nb)));
    }
}

template <int C, typename A>
float dot_row(const uint8_t* qrow, const float* drow, const Row<A>& x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const __m256i dot = block_dot<C>(qrow + b * block_bytes(C), x.q, b, nb);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(drow[b] * x.dx[b]), acc);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 s = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#else
template <int C, typename A>
float dot_row(const uint8_t* qrow, const float* drow, const Row<A>& x, int64_t nb) {
    return dot_blocks<C>(qrow, drow, x, 0, nb, nb);
}
#endif

// the min term: sum over blocks of m[b] * sx[b] (Q4_0: m = -8 d; Q8_0: none)
#if !DISAGG_VNNI
constexpr int64_t ROWS = 4;
template <int C, typename A>
void dot_pairs(const uint8_t* qrow, const float* drow, const Row<A>* xs, int64_t rows, int64_t nb, float* out) {
    for (int64_t r = 0; r < rows; ++r) out[r] = dot_row<C>(qrow, drow, xs[r], nb);
}
#endif

template <int C, typename A>
float min_term(const float* drow, const float* mrow, const Row<A>& x, int64_t nb) {
    if (C == S8 && !mrow) return 0.0f;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) acc += block_min<C>(mrow, b, drow[b]) * x.sx[b];
    return acc;
}

template <int C, typename A>
void matmul_int(const std::vector<Row<A>>& xs, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
             float* y, int threads) {
    const int64_t nb = K / QK, B = static_cast<int64_t>(xs.size());
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qrow = qs + n * nb * block_bytes(C);
        const float* drow = d + n * nb;
        const float* mrow = m ? m + n * nb : nullptr;
        fetch_ahead(qrow, PREFETCH_ROWS * nb * block_bytes(C), nb * block_bytes(C));  // as cpu_quant.cpp's matmul
        fetch_ahead(drow, PREFETCH_ROWS * nb * 4, nb * 4);
        if (mrow) fetch_ahead(mrow, PREFETCH_ROWS * nb * 4, nb * 4);
        for (int64_t r0 = 0; r0 < B; r0 += ROWS) {
            const int64_t rows = B - r0 < ROWS ? B - r0 : ROWS;
            float out[ROWS];
            dot_pairs<C>(qrow, drow, xs.data() + r0, rows, nb, out);
            for (int64_t r = 0; r < rows; ++r)
                y[(r0 + r) * N + n] = out[r] + min_term<C>(drow, mrow, xs[r0 + r], nb);
        }
    }
}

template <typename A>
void matmul_rounded(int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d,
                    const float* m, int64_t N, float* y, int threads) {
    const int64_t nb = K / QK;
    std::vector<A> q(static_cast<size_t>(B * K));
    std::vector<float> scales(static_cast<size_t>(2 * B * nb));
    std::vector<Row<A>> xs(static_cast<size_t>(B));
    for (int64_t r = 0; r < B; ++r) {
        float* dx = scales.data() + 2 * r * nb;
        round_row(x + r * K, K, q.data() + r * K, dx, dx + nb);
        xs[r] = Row<A>{q.data() + r * K, dx, dx + nb};
    }
    if (codes == NIB) matmul_int<NIB>(xs, K, qs, d, m, N, y, threads);
    else if (codes == S8) matmul_int<S8>(xs, K, qs, d, m, N, y, threads);
    else matmul_int<U8>(xs, K, qs, d, m, N, y, threads);
}

}  // namespace

extern "C" {

// as disagg_quant_matmul, with x rounded per block of 32 first: to int8 (bits 8) or int16 (bits 16)
void disagg_quant_matmul(int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d,
                         const float* m, int64_t N, float* y, int threads);

void disagg_quant_matmul_int(int bits, int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs,
                             const float* d, const float* m, int64_t N, float* y, int threads) {
    if (codes == 3) return disagg_quant_matmul(codes, x, B, K, qs, d, m, N, y, threads);  // float32 weights
    if (bits == 8) matmul_rounded<int8_t>(codes, x, B, K, qs, d, m, N, y, threads);
    else matmul_rounded<int16_t>(codes, x, B, K, qs, d, m, N, y, threads);
}

// 1 when the integer dots run on VNNI here, 0 for the portable loop
int disagg_quant_int_vnni() { return DISAGG_VNNI; }

}  // extern "C"
