// Integer-activation matmuls of many rows (a prefill chunk, a batch of decode rows): y[B, N] = x[B, K] @ W^T with
// cpu_dot8.cpp's arithmetic (x rounded per block of 32: dx = amax / L, qx = round(x / dx), sx = dx * sum(qx); per
// weight block x . w = d * dx * (q . qx) + m * sx), laid out as a blocked GEMM instead of one weight row at a time.
// The integer dots are the same integers (for Q8_0 under int8, the codes' shift by 128, below, is taken back in the
// float min term: the same value up to float rounding); the float sums run in another order.  The engine takes it
// for int16 activations (engine/quant.py `QuantConfig.blocked_from`); int8 and int16 are tested alike.
//
// Why another layout: cpu_dot8.cpp puts a block's 32 codes across a vector's lanes, so every block of every row
// ends in a lane permute and a scale per lane.  Here a vector's 16 lanes are 16 output columns.  Each thread packs
// a panel of 16 weight rows at a time (per call, into a buffer it reuses; the codes of 16 rows are transposed in
// registers) as [block][group][16 columns] dwords, a group being 4 byte codes (int8: `vpdpbusd`, unsigned codes by
// signed activations) or 2 word codes (int16: `vpdpwssd`), and broadcasts an activation group to all lanes.  A
// block then costs 8 (int8) or 16 (int16) dot instructions per row and panel, plus a convert, a multiply and two
// FMAs for its scales (d * dx and m * sx, the scales packed per panel too).  RM rows of x by RN panels are
// computed at once, so each packed group and each broadcast is used RM x RN times.
//
// Codes as unsigned bytes for `vpdpbusd`: Q8_0's signed codes are shifted by 128 (q + 128 as u8) and its min is
// then -128 d, as Q4_0's is -8 d; int16 takes the signed code as it is (no min).
//
// AVX-512 VNNI only: other builds answer with the row kernel (disagg_quant_matmul_int), the same integers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_blocks.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DISAGG_GEMM8 1
#else
#define DISAGG_GEMM8 0
#endif

extern "C" void disagg_quant_matmul_int(int bits, int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs,
                                        const float* d, const float* m, int64_t N, float* y, int threads);

#if DISAGG_GEMM8
namespace {

using namespace disagg_blocks;
constexpr int64_t LANES = 16;
// rows of x by panels of 16 columns per micro-kernel (16 + 16 accumulators): 6 x 2, 8 x 1, 4 x 3 and 3 x 4 measured
// the same or slower here (AMD EPYC, AVX-512 VNNI), where int16 runs near the dot instructions' own rate
constexpr int RM = 4, RN = 2;
constexpr uintptr_t ALIGN = 64;  // bytes: the packed panels are read with aligned 512-bit loads

template <typename T>  // the first ALIGN-byte boundary in a buffer with LANES spare elements
T* aligned(T* p) { return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + ALIGN - 1) & ~(ALIGN - 1)); }

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
}

template <typename A>
constexpr int64_t groups() { return QK * static_cast<int64_t>(sizeof(A)) / 4; }  // dwords of codes per block

template <typename A>
struct Rounded {  // x rounded, plain layout: q [B, K], dx and sx [B, nb]
    std::vector<A> q;
    std::vector<float> dx, sx;
};

// called by every thread of a parallel region (the blocks are shared out; `out` is sized before the region)
template <typename A>
void round_rows(const float* x, int64_t B, int64_t K, Rounded<A>& out) {
    const int64_t nb = K / QK;
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < B * nb; ++rb)
        round_block(x + rb * QK, out.q.data() + rb * QK, [](int j) { return j; }, out.dx[static_cast<size_t>(rb)],
                    out.sx[static_cast<size_t>(rb)]);
}

// a weight block's 32 codes as bytes in element order (Q8_0's signed ones as they are)
template <int C>
inline __m256i block_bytes32(const uint8_t* q) {
    if constexpr (C == NIB) {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), mask = _mm_set1_epi8(0x0F);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), mask), _mm_and_si128(t, mask));
    } else {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    }
}

// `16 / groups` blocks of one weight row as 16 dwords of A codes: int8 unsigned bytes (Q8_0 shifted by 128), two
// blocks; int16 words, one block.  Blocks past nb are zeros.
template <int C, typename A>
inline __m512i row_codes(const uint8_t* row, int64_t b, int64_t nb) {
    if constexpr (sizeof(A) == 1) {
        const __m256i shift = _mm256_set1_epi8(C == S8 ? static_cast<char>(0x80) : 0);
        const __m256i lo = _mm256_xor_si256(block_bytes32<C>(row + b * block_bytes(C)), shift);
        const __m256i hi = b + 1 < nb ? _mm256_xor_si256(block_bytes32<C>(row + (b + 1) * block_bytes(C)), shift)
                                      : _mm256_setzero_si256();
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    } else {
        const __m256i t = block_bytes32<C>(row + b * block_bytes(C));
        return C == S8 ? _mm512_cvtepi8_epi16(t) : _mm512_cvtepu8_epi16(t);
    }
}

// r[i] holds 16 dwords of row i; after it, r[j] holds dword j of every row (unpacks within 128-bit lanes, then
// lane shuffles)
inline void transpose16(__m512i r[LANES]) {
    __m512i t[LANES];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + k], lane L: dword 4 L + k of rows i .. i + 3
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; ++k) {
        t[k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44);  // lanes 0, 1 of each
        t[4 + k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);  // lanes 2, 3
        t[8 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
        t[12 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xDD);
    }
}

// panel of 16 weight rows from n0 (rows past N are zeros): codes [nb][groups][16] dwords, d and m [nb][16]
template <int C, typename A>
void pack_panel(const uint8_t* qs, const float* d, const float* m, int64_t n0, int64_t N, int64_t nb,
                uint32_t* codes, float* dp, float* mp) {
    constexpr int64_t G = groups<A>(), step = LANES / G;  // blocks per transpose: 2 (int8) or 1 (int16)
    for (int64_t c = 0; c < LANES; ++c)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t n = n0 + c;
            const float db = n < N ? d[n * nb + b] : 0.0f;
            dp[b * LANES + c] = db;
            // the min (cpu_blocks.h), and for Q8_0 as unsigned bytes (int8) the shift's -128 d
            const float shift = C == S8 && sizeof(A) == 1 ? -128.0f * db : 0.0f;
            mp[b * LANES + c] = n < N ? block_min<C>(m ? m + n * nb : nullptr, b, db) + shift : 0.0f;
        }
    for (int64_t b = 0; b < nb; b += step) {
        __m512i r[LANES];
        for (int64_t c = 0; c < LANES; ++c)
            r[c] = n0 + c < N ? row_codes<C, A>(qs + (n0 + c) * nb * block_bytes(C), b, nb) : _mm512_setzero_si512();
        transpose16(r);
        const int64_t rows = (nb - b < step ? nb - b : step) * G;
        for (int64_t g = 0; g < rows; ++g) _mm512_store_si512(codes + (b * G + g) * LANES, r[g]);
    }
}

// R rows (<= RM) of x by RN packed panels: y[r, 16 n + lane] for the panels' columns
template <typename A, int R>
void micro(const Rounded<A>& x, int64_t r0, int64_t K, const uint32_t* codes, const float* dp, const float* mp,
           int64_t panel_dwords, int64_t nb, __m512 acc[RM][RN]) {
    constexpr int64_t G = groups<A>();
    for (int r = 0; r < R; ++r)
        for (int n = 0; n < RN; ++n) acc[r][n] = _mm512_setzero_ps();
    const A* xq[R];
    for (int r = 0; r < R; ++r) xq[r] = x.q.data() + (r0 + r) * K;
    for (int64_t b = 0; b < nb; ++b) {
        __m512i dot[R][RN];
        for (int r = 0; r < R; ++r)
            for (int n = 0; n < RN; ++n) dot[r][n] = _mm512_setzero_si512();
        const uint32_t* cb = codes + b * G * LANES;
        for (int64_t g = 0; g < G; ++g) {
            __m512i w[RN];
            for (int n = 0; n < RN; ++n) w[n] = _mm512_load_si512(cb + n * panel_dwords + g * LANES);
            for (int r = 0; r < R; ++r) {
                int32_t group;  // 4 bytes or 2 words of activation codes, read as one dword (memcpy: no aliasing)
                std::memcpy(&group, xq[r] + (b * G + g) * (4 / static_cast<int64_t>(sizeof(A))), sizeof(group));
                const __m512i a = _mm512_set1_epi32(group);
                for (int n = 0; n < RN; ++n) {
                    if constexpr (sizeof(A) == 1) dot[r][n] = _mm512_dpbusd_epi32(dot[r][n], w[n], a);
                    else dot[r][n] = _mm512_dpwssd_epi32(dot[r][n], w[n], a);
                }
            }
        }
        for (int n = 0; n < RN; ++n) {
            const __m512 dv = _mm512_load_ps(dp + n * nb * LANES + b * LANES);
            const __m512 mv = _mm512_load_ps(mp + n * nb * LANES + b * LANES);
            for (int r = 0; r < R; ++r) {
                const int64_t rb = (r0 + r) * nb + b;
                const __m512 s = _mm512_mul_ps(dv, _mm512_set1_ps(x.dx[rb]));
                acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][n]), s, acc[r][n]);
                acc[r][n] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.sx[rb]), acc[r][n]);
            }
        }
    }
}

template <typename A, int R>
void rows_out(const Rounded<A>& x, int64_t r0, int64_t K, const uint32_t* codes, const float* dp, const float* mp,
              int64_t panel_dwords, int64_t nb, int64_t n0, int64_t N, float* y) {
    __m512 acc[RM][RN];
    micro<A, R>(x, r0, K, codes, dp, mp, panel_dwords, nb, acc);
    for (int n = 0; n < RN; ++n) {
        const int64_t c0 = n0 + n * LANES;
        if (c0 >= N) break;
        const __mmask16 keep = lanes16(N - c0);
        for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * N + c0, keep, acc[r][n]);
    }
}

// the last B % RM rows: rows_out for exactly `left` of them
template <typename A, int R>
void rows_tail(int64_t left, const Rounded<A>& x, int64_t r0, int64_t K, const uint32_t* codes, const float* dp,
               const float* mp, int64_t panel_dwords, int64_t nb, int64_t n0, int64_t N, float* y) {
    if constexpr (R > 0) {
        if (left == R) rows_out<A, R>(x, r0, K, codes, dp, mp, panel_dwords, nb, n0, N, y);
        else rows_tail<A, R - 1>(left, x, r0, K, codes, dp, mp, panel_dwords, nb, n0, N, y);
    }
}

template <int C, typename A>
void gemm(const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N, float* y,
          int threads) {
    const int64_t nb = K / QK, panel_dwords = nb * groups<A>() * LANES, width = RN * LANES;
    // buffers kept per thread between calls (a decode step makes ~120 of them): grown, never zero-filled again
    static thread_local Rounded<A> mine;
    Rounded<A>& rx = mine;  // the calling thread's: the region's threads all use this one (a name, not a TLS lookup)
    grow(rx.q, B * K);
    grow(rx.dx, B * nb);
    grow(rx.sx, B * nb);
#pragma omp parallel num_threads(threads)
    {
        round_rows(x, B, K, rx);  // one parallel region for the rounding and the GEMM (its `for` ends in a barrier)
        // this thread's packed panels, reused for each of its column groups (every slot read is written first)
        static thread_local std::vector<uint32_t> raw;
        static thread_local std::vector<float> sraw;
        grow(raw, RN * panel_dwords + LANES);
        grow(sraw, 2 * RN * nb * LANES + LANES);
        uint32_t* codes = aligned(raw.data());
        float* dp = aligned(sraw.data());
        float* mp = dp + RN * nb * LANES;
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += width) {
            for (int n = 0; n < RN; ++n)
                pack_panel<C, A>(qs, d, m, n0 + n * LANES, N, nb, codes + n * panel_dwords, dp + n * nb * LANES,
                                 mp + n * nb * LANES);
            int64_t r0 = 0;
            for (; r0 + RM <= B; r0 += RM) rows_out<A, RM>(rx, r0, K, codes, dp, mp, panel_dwords, nb, n0, N, y);
            rows_tail<A, RM - 1>(B - r0, rx, r0, K, codes, dp, mp, panel_dwords, nb, n0, N, y);
        }
    }
}

template <typename A>
void gemm_codes(int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs, const float* d, const float* m,
                int64_t N, float* y, int threads) {
    if (codes == NIB) gemm<NIB, A>(x, B, K, qs, d, m, N, y, threads);
    else if (codes == S8) gemm<S8, A>(x, B, K, qs, d, m, N, y, threads);
    else gemm<U8, A>(x, B, K, qs, d, m, N, y, threads);
}

}  // namespace
#endif

extern "C" {

// as disagg_quant_matmul_int (bits 8 or 16; codes 0 four-bit, 1 Q8_0, 2 U8), blocked for wide x
void disagg_quant_gemm_int(int bits, int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs,
                           const float* d, const float* m, int64_t N, float* y, int threads) {
#if DISAGG_GEMM8
    if (codes <= 2) {
        if (bits == 8) gemm_codes<uint8_t>(codes, x, B, K, qs, d, m, N, y, threads);
        else gemm_codes<int16_t>(codes, x, B, K, qs, d, m, N, y, threads);
        return;
    }
#endif
    disagg_quant_matmul_int(bits, codes, x, B, K, qs, d, m, N, y, threads);
}

// 1 when the blocked kernel is built here (AVX-512 VNNI), 0 when the row kernel answers
int disagg_quant_gemm_blocked() { return DISAGG_GEMM8; }

}  // extern "C"
