// Block matmuls with int16 activations over weights packed once, at load, into panels of 16 output columns: y[B, N]
// = x[B, K] @ W^T with cpu_dot8.cpp's arithmetic (x rounded per block of 32: dx = amax / 32767, qx = round(x / dx),
// sx = dx * sum(qx); per weight block x . w = d * dx * (q . qx) + m * sx), the same integer dots.
//
// Why: cpu_dot8.cpp's row kernel puts a block's 32 codes across a vector's lanes, so every block of every row ends
// in a lane permute and a scale per lane: a verified or batched row costs nearly what the first row does.
// cpu_gemm8.cpp puts 16 output columns across the lanes, so a row costs its dot instructions and little else, but it
// transposes its weights into that layout on every call (as int16 words, 4x the bytes of the codes): at 1-8 rows
// the transposition costs more than the rows.  Here the transposition is done once, and a panel keeps the codes'
// own width (nibbles stay nibbles), laid out so that a 64-byte load and a shift and a mask per group give four
// groups of 2 int16 codes per lane (8-bit codes: one widening per group).  Each block and column keeps a float32
// scale and minimum: the bytes of the row layout for Q4_1 and U8; Q4_0 and Q8_0, which store no minimum, gain
// 4 bytes per 32 weights (+20% and +11%).  A row then costs 16
// `vpdpwssd` per block and panel, and the weights are read once per step whatever the row count (at most RM rows
// of x at a time; a step of more rows reads each panel again from cache).
//
// Layout, per panel of 16 columns (columns past N are zeros), per block b of 32 weights along K:
//     codes  NIB: 4 chunks of 64 bytes, each 32 little-endian 16-bit words; chunk j, word 2c + e: nibble i (bits
//                 4i .. 4i + 3) is the code of column c, element 2 (4j + i) + e
//            8-bit (Q8_0 signed, U8 unsigned): 8 chunks of 64 bytes; chunk j, byte 2c + e of half h: code (c,
//                 2 (2j + h) + e)
//     d[16], m[16] float32: the block's scale and minimum per column (cpu_blocks.h's `block_min`)
// Panels follow one another; a panel is nb blocks.
//
// AVX-512 VNNI only: `disagg_quant_panels_built` says 0 elsewhere and the caller keeps the row layout (the matmul
// built elsewhere answers NaN: never called there).  `disagg_quant_panel_rows` reads rows back (a tied embedding's
// lookup reads the LM head's panels instead of keeping its own copy of the matrix).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_blocks.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DISAGG_PANELS 1
#else
#define DISAGG_PANELS 0
#endif

namespace {

using namespace disagg_blocks;
constexpr int64_t LANES = 16;
constexpr int64_t GROUPS = QK / 2;  // dwords of 2 int16 activations per block

inline int64_t code_bytes(int c) { return block_bytes(c) * LANES; }  // a panel block's codes
inline int64_t panel_block_bytes(int c) { return code_bytes(c) + 2 * LANES * 4; }

template <int C>
inline int code_at(const uint8_t* block, int64_t j) {  // element j of one weight block, as a signed or unsigned int
    if constexpr (C == NIB) return j < 16 ? (block[j] & 0x0F) : (block[j - 16] >> 4);
    else if constexpr (C == S8) return reinterpret_cast<const int8_t*>(block)[j];
    else return block[j];
}

// where element k of column c sits in a panel block: its byte, and the shift of its bits within it
template <int C>
inline void slot_of(int64_t c, int64_t k, int64_t& byte, int& shift) {
    const int64_t g = k / 2, e = k % 2;
    if constexpr (C == NIB) {  // group g = 4j + i: nibble i of word 2c + e of chunk j
        const int64_t j = g / 4, i = g % 4;
        byte = j * 64 + 2 * (2 * c + e) + i / 2, shift = 4 * static_cast<int>(i % 2);
    } else {  // group g = 2j + h: byte 2c + e of half h of chunk j
        byte = (g / 2) * 64 + (g % 2) * 32 + 2 * c + e, shift = 0;
    }
}

template <int C>
void pack(const uint8_t* qs, const float* d, const float* m, int64_t N, int64_t K, uint8_t* out, int threads) {
    const int64_t nb = K / QK, panels = (N + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t* blk = out + (p * nb + b) * panel_block_bytes(C);
            std::memset(blk, 0, static_cast<size_t>(panel_block_bytes(C)));
            float* dp = reinterpret_cast<float*>(blk + code_bytes(C));
            float* mp = dp + LANES;
            for (int64_t c = 0; c < LANES; ++c) {
                const int64_t n = p * LANES + c;
                if (n >= N) break;
                const uint8_t* src = qs + (n * nb + b) * block_bytes(C);
                dp[c] = d[n * nb + b];
                mp[c] = block_min<C>(m ? m + n * nb : nullptr, b, dp[c]);
                for (int64_t k = 0; k < QK; ++k) {
                    int64_t byte;
                    int shift;
                    slot_of<C>(c, k, byte, shift);
                    blk[byte] |= static_cast<uint8_t>(code_at<C>(src, k) << shift);
                }
            }
        }
}

// rows `idx` of a packed [N, K] matrix de-quantized to float32 (w = d q + m; an index outside 0..N-1 gives NaN)
template <int C>
void rows(const uint8_t* panels, int64_t N, int64_t K, const int64_t* idx, int64_t count, float* out) {
    const int64_t nb = K / QK;
    for (int64_t r = 0; r < count; ++r) {
        const int64_t n = idx[r], c = n % LANES;
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t k = 0; k < QK; ++k) {
                float& w = out[r * K + b * QK + k];
                if (n < 0 || n >= N) {
                    w = NAN;
                    continue;
                }
                const uint8_t* blk = panels + ((n / LANES) * nb + b) * panel_block_bytes(C);
                const float* dp = reinterpret_cast<const float*>(blk + code_bytes(C));
                int64_t byte;
                int shift;
                slot_of<C>(c, k, byte, shift);
                const int v = C == NIB ? (blk[byte] >> shift) & 0x0F
                                       : C == S8 ? static_cast<int>(static_cast<int8_t>(blk[byte])) : blk[byte];
                w = dp[c] * static_cast<float>(v) + dp[LANES + c];
            }
    }
}

#if DISAGG_PANELS
// rows of x by panels per micro-kernel: 12 dot and 12 float accumulators (4-bit codes: 8 more registers of codes,
// a few spill); 6 rows a pass serve a 5-row verification in one pass, and measured as 5 or better from 8 rows
constexpr int RM = 6, RN = 2;

// Each panel's blocks this far ahead are fetched while a block is computed (cpu_blocks.h's fetch_ahead; 4 to 8
// measured alike)
constexpr int64_t PREFETCH_BLOCKS = 6;

template <int C>
inline __m512i widen(__m256i t) { return C == S8 ? _mm512_cvtepi8_epi16(t) : _mm512_cvtepu8_epi16(t); }

template <int C>
constexpr int PER_CHUNK = C == NIB ? 4 : 2;  // groups per 64-byte chunk of codes
template <int C>
constexpr int CHUNKS = GROUPS / PER_CHUNK<C>;

// chunk j of a panel block's codes as int16 pairs per lane: groups PER_CHUNK j .. PER_CHUNK (j + 1) - 1 into w
template <int C>
inline void chunk(const uint8_t* blk, int j, __m512i* w) {
    const __m512i v = _mm512_load_si512(blk + 64 * j);
    if constexpr (C == NIB) {  // each word holds its lane's code of 4 groups, a nibble each: shifts and masks
        const __m512i mask = _mm512_set1_epi16(0x000F);
        w[0] = _mm512_and_si512(v, mask);
        w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 8), mask);
        w[3] = _mm512_srli_epi16(v, 12);
    } else {
        w[0] = widen<C>(_mm512_castsi512_si256(v));
        w[1] = widen<C>(_mm512_extracti64x4_epi64(v, 1));
    }
}

struct Rounded {  // x rounded: q [B, K] int16, dx and sx [B, nb]
    std::vector<int16_t> q;
    std::vector<float> dx, sx;
};

// R rows of x from r0 by `np` (<= RN) panels from p0, into y.  Each chunk of codes is widened for all RN panels,
// then every row's activation pair meets all of them: R x RN independent dot chains keep the dot unit busy.
template <int C, int R>
void micro(const Rounded& x, int64_t r0, int64_t K, const uint8_t* panels, int64_t p0, int np, int64_t N, float* y) {
    const int64_t nb = K / QK, bbytes = panel_block_bytes(C);
    __m512 acc[R][RN];
    for (int r = 0; r < R; ++r)
        for (int n = 0; n < RN; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk[RN];  // a missing last panel reads the one before it; its sums are never stored
        for (int n = 0; n < RN; ++n) blk[n] = panels + ((p0 + (n < np ? n : np - 1)) * nb + b) * bbytes;
        for (int n = 0; n < RN; ++n) fetch_ahead(blk[n], PREFETCH_BLOCKS * bbytes, bbytes);
        __m512i dot[R][RN];
        for (int r = 0; r < R; ++r)
            for (int n = 0; n < RN; ++n) dot[r][n] = _mm512_setzero_si512();
        const int16_t* xb = x.q.data() + r0 * K + b * QK;
        for (int j = 0; j < CHUNKS<C>; ++j) {
            __m512i w[RN][PER_CHUNK<C>];
            for (int n = 0; n < RN; ++n) chunk<C>(blk[n], j, w[n]);
            for (int i = 0; i < PER_CHUNK<C>; ++i)
                for (int r = 0; r < R; ++r) {
                    int32_t pair;  // 2 int16 activations as one dword (memcpy: no aliasing)
                    std::memcpy(&pair, xb + r * K + 2 * (PER_CHUNK<C> * j + i), sizeof(pair));
                    const __m512i a = _mm512_set1_epi32(pair);
                    for (int n = 0; n < RN; ++n) dot[r][n] = _mm512_dpwssd_epi32(dot[r][n], w[n][i], a);
                }
        }
        for (int n = 0; n < RN; ++n) {
            const float* dp = reinterpret_cast<const float*>(blk[n] + code_bytes(C));
            const __m512 dv = _mm512_load_ps(dp), mv = _mm512_load_ps(dp + LANES);
            for (int r = 0; r < R; ++r) {
                const int64_t rb = (r0 + r) * nb + b;
                const __m512 s = _mm512_mul_ps(dv, _mm512_set1_ps(x.dx[rb]));
                acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][n]), s, acc[r][n]);
                acc[r][n] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.sx[rb]), acc[r][n]);
            }
        }
    }
    for (int n = 0; n < np; ++n) {
        const int64_t c0 = (p0 + n) * LANES;
        const __mmask16 keep = lanes16(N - c0);
        for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * N + c0, keep, acc[r][n]);
    }
}

template <int C, int R>  // the last B % RM rows: micro for exactly `left` of them
void tail(int64_t left, const Rounded& x, int64_t r0, int64_t K, const uint8_t* panels, int64_t p0, int np,
          int64_t N, float* y) {
    if constexpr (R > 0) {
        if (left == R) micro<C, R>(x, r0, K, panels, p0, np, N, y);
        else tail<C, R - 1>(left, x, r0, K, panels, p0, np, N, y);
    }
}

template <int C>
void matmul(const float* x, int64_t B, int64_t K, const uint8_t* panels, int64_t N, float* y, int threads) {
    const int64_t nb = K / QK, npanels = (N + LANES - 1) / LANES;
    static thread_local Rounded mine;  // kept per calling thread between calls: grown, never zero-filled again
    Rounded& rx = mine;
    if (rx.q.size() < static_cast<size_t>(B * K)) rx.q.resize(static_cast<size_t>(B * K));
    if (rx.dx.size() < static_cast<size_t>(B * nb)) {
        rx.dx.resize(static_cast<size_t>(B * nb));
        rx.sx.resize(static_cast<size_t>(B * nb));
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t rb = 0; rb < B * nb; ++rb)
            round_block(x + rb * QK, rx.q.data() + rb * QK, [](int j) { return j; }, rx.dx[static_cast<size_t>(rb)],
                        rx.sx[static_cast<size_t>(rb)]);
#pragma omp for schedule(static)
        for (int64_t p0 = 0; p0 < npanels; p0 += RN) {
            const int np = npanels - p0 < RN ? static_cast<int>(npanels - p0) : RN;
            int64_t r0 = 0;
            for (; r0 + RM <= B; r0 += RM) micro<C, RM>(rx, r0, K, panels, p0, np, N, y);
            tail<C, RM - 1>(B - r0, rx, r0, K, panels, p0, np, N, y);
        }
    }
}
#endif

}  // namespace

extern "C" {

// bytes of a [N, K] matrix of `codes` (0 four-bit, 1 Q8_0, 2 U8) packed into panels; 0 for other codes (F32)
int64_t disagg_quant_panels_bytes(int codes, int64_t N, int64_t K) {
    if (codes != NIB && codes != S8 && codes != U8) return 0;
    return (N + LANES - 1) / LANES * (K / QK) * panel_block_bytes(codes);
}

// the row layout's blocks (cpu_quant.cpp's) packed into panels at `out` (64-byte aligned, the size above)
void disagg_quant_pack_panels(int codes, const uint8_t* qs, const float* d, const float* m, int64_t N, int64_t K,
                              uint8_t* out, int threads) {
    if (codes == NIB) pack<NIB>(qs, d, m, N, K, out, threads);
    else if (codes == S8) pack<S8>(qs, d, m, N, K, out, threads);
    else if (codes == U8) pack<U8>(qs, d, m, N, K, out, threads);
}

// rows `idx` (`count` of them) of a packed matrix, de-quantized into out [count, K] (an embedding lookup)
void disagg_quant_panel_rows(int codes, const uint8_t* panels, int64_t N, int64_t K, const int64_t* idx,
                             int64_t count, float* out) {
    if (codes == NIB) rows<NIB>(panels, N, K, idx, count, out);
    else if (codes == S8) rows<S8>(panels, N, K, idx, count, out);
    else if (codes == U8) rows<U8>(panels, N, K, idx, count, out);
}

// y[B, N] = x[B, K] @ W^T over packed panels, x rounded to int16 per block of 32 (as disagg_quant_matmul_int with
// bits 16: the same integer dots)
void disagg_quant_panels_int16(int codes, const float* x, int64_t B, int64_t K, const uint8_t* panels, int64_t N,
                               float* y, int threads) {
#if DISAGG_PANELS
    if (codes == NIB) matmul<NIB>(x, B, K, panels, N, y, threads);
    else if (codes == S8) matmul<S8>(x, B, K, panels, N, y, threads);
    else matmul<U8>(x, B, K, panels, N, y, threads);
#else
    (void)codes, (void)x, (void)K, (void)panels, (void)threads;
    for (int64_t i = 0; i < B * N; ++i) y[i] = NAN;
#endif
}

// 1 when the panel kernel is built here (AVX-512 VNNI)
int disagg_quant_panels_built() { return DISAGG_PANELS; }

}  // extern "C"
