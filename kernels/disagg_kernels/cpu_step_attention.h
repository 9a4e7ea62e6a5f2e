// Attention for the native step (cpu_step.cpp), over a cache of float32 rows or of int8 rows with a float16 scale
// (cpu_kv8.h).  Included by cpu_step.cpp only; the build key of the library (native_build.py) covers this header.
//
// A row is read through its type: `Floats` as stored, `Int8s` as its values times its scale, converted in registers
// as they are loaded - float(code) * scale, the very product KVFormat.decode computes - so an int8 cache is read
// with decode's bits without writing a de-quantized copy (which, a walk's K and V at 1,500 slots, left the L2).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_blocks.h"
#include "cpu_expf.h"
#include "cpu_kv8.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

struct Floats {  // a float32 cache row
    const float* p;
    static int64_t bytes(int64_t values) { return 4 * values; }
    float at(int64_t i) const { return p[i]; }
#if defined(__AVX512F__)
    __m512 load16(int64_t c) const { return _mm512_loadu_ps(p + c); }
#endif
#if defined(__AVX2__)
    __m256 load8(int64_t c) const { return _mm256_loadu_ps(p + c); }
#endif
};

struct Int8s {  // an int8 cache row: its values, then its float16 scale (read once, as the row is taken)
    const int8_t* p;
    float scale;
    static int64_t bytes(int64_t values) { return values + KV8_SCALE_BYTES; }
    float at(int64_t i) const { return static_cast<float>(p[i]) * scale; }
#if defined(__AVX512F__)
    __m512 load16(int64_t c) const {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), _mm512_set1_ps(scale));
    }
#endif
#if defined(__AVX2__)
    __m256 load8(int64_t c) const {
        const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + c));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), _mm256_set1_ps(scale));
    }
#endif
};

inline Int8s int8_row(const uint8_t* row, int64_t D) {
    uint16_t h;
    std::memcpy(&h, row + D, sizeof(h));
    return Int8s{reinterpret_cast<const int8_t*>(row), float_from_half(h)};
}

// a . b, 16 (AVX2: 8) lanes of products summed by one vector reduction, then the tail: the order every score (and
// the RMSNorm's sum of squares, cpu_step.cpp) is summed in
template <typename Row>
inline float row_dot(const float* a, const Row& b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), b.load16(i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), b.load8(i), acc);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
#endif
    for (; i < n; ++i) s += a[i] * b.at(i);
    return s;
}

// On the AVX-512 paths (D a multiple of 16), K and V rows this many keys ahead are fetched while a key is scored or
// weighed (cpu_blocks.h's fetch_ahead): a sequence's rows sit a slot apart in its cache blocks and blocks lie where
// the pool put them, so at long contexts the attention waited on its keys' loads.  Two groups of 16 keys: not
// tuned; with it a decode step at 1,500 slots took 2-4% less (docs/benchmarks.md, "Weights fetched ahead").  On
// every path, a walk (cpu_step.cpp) fetches its first KEYS_AHEAD keys' rows before it starts
constexpr int64_t KEYS_AHEAD = 32;

#if defined(__AVX512F__)
// lane i of the result: v[i]'s 16 lanes summed in _mm512_reduce_add_ps's order (lane k + lane k + 8, then k + 4,
// k + 2, k + 1; what `row_dot` does for each key), for 16 vectors at once (~3 instructions a vector, not ~8)
inline __m512 sum16(const __m512 v[16]) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; ++i)  // 256-bit halves: blocks [v2i: b0 + b2, b1 + b3, v2i+1: b0 + b2, b1 + b3]
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44));
    for (int i = 0; i < 4; ++i)  // 128-bit halves: block b of y[i] is vector 4i + b's 4 partial sums
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88));
    for (int i = 0; i < 2; ++i) {  // 64-bit halves: block b of z[i]: vector 8i + b's 2 sums, then 8i + 4 + b's
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(y[2 * i]), _mm512_castps_pd(y[2 * i + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(y[2 * i]), _mm512_castps_pd(y[2 * i + 1]));
        z[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    // the last pairs: block b, lane m holds vector 4m + b; put vector i in lane i
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
    const __m512i at = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(at, r);
}

// out_i += sum over j in [from, to) of p_i[j] v_j for G queries at once, their sums in registers
template <int C, int G, typename Row>
void weigh_group(const float* const p[], const Row* v, int64_t from, int64_t to, float* const out[]) {
    __m512 a[G][C];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) a[g][c] = _mm512_loadu_ps(out[g] + 16 * c);
    for (int64_t j = from; j < to; ++j) {
        if (j + KEYS_AHEAD < to) disagg_blocks::fetch_ahead(v[j + KEYS_AHEAD].p, 0, Row::bytes(16 * C));
        __m512 row[C];
        for (int c = 0; c < C; ++c) row[c] = v[j].load16(16 * c);
        for (int g = 0; g < G; ++g) {
            const __m512 w = _mm512_set1_ps(p[g][j]);
            for (int c = 0; c < C; ++c) a[g][c] = _mm512_fmadd_ps(w, row[c], a[g][c]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[g] + 16 * c, a[g][c]);
}
#endif

// out[D] = sum over j < n of (e[j] / sum) v[j], key by key (e is left divided by the sum)
template <typename Row>
void weighted_rows(float* e, float sum, const Row* v, int64_t n, int64_t D, float* out) {
#if defined(__AVX512F__)
    if (D == 16 || D == 32 || D == 64 || D == 128) {  // one query's group: its sums in registers
        for (int64_t j = 0; j < n; ++j) e[j] /= sum;
        std::fill(out, out + D, 0.0f);
        const float* p[1] = {e};
        float* const o[1] = {out};
        if (D == 16) weigh_group<1, 1>(p, v, 0, n, o);
        else if (D == 32) weigh_group<2, 1>(p, v, 0, n, o);
        else if (D == 64) weigh_group<4, 1>(p, v, 0, n, o);
        else weigh_group<8, 1>(p, v, 0, n, o);
        return;
    }
#endif
    for (int64_t i = 0; i < D; ++i) out[i] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const float p = e[j] / sum;
        for (int64_t i = 0; i < D; ++i) out[i] += p * v[j].at(i);
    }
}

// one query over the keys it sees (their K and V rows k[j], v[j], j < n)
template <typename Row>
void attend_keys(const float* q, const Row* k, const Row* v, int64_t n, int64_t D, float scale, float* scores,
                 float* out) {
    float mx = -INFINITY;
    int64_t j = 0;
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= n; j += 16) {
            for (int64_t t = j + KEYS_AHEAD; t < std::min(j + KEYS_AHEAD + 16, n); ++t)
                disagg_blocks::fetch_ahead(k[t].p, 0, Row::bytes(D));
            __m512 part[16];
            for (int64_t t = 0; t < 16; ++t) {
                part[t] = _mm512_setzero_ps();
                for (int64_t c = 0; c < D; c += 16)
                    part[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), k[j + t].load16(c), part[t]);
            }
            const __m512 sc = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
            _mm512_storeu_ps(scores + j, sc);
            mv = _mm512_max_ps(mv, sc);
        }
        mx = _mm512_reduce_max_ps(mv);
    }
#endif
    for (; j < n; ++j) {
        scores[j] = row_dot(q, k[j], D) * scale;
        mx = scores[j] > mx ? scores[j] : mx;
    }
    disagg_expf::exp_shifted(scores, n, mx);
    float sum = 0.0f;
    for (j = 0; j < n; ++j) sum += scores[j];
    weighted_rows(scores, sum, v, n, D, out);
}

#if defined(__AVX512F__)
// A tile: the queries of one walk that read the same keys (a sequence's tokens in this step times the query heads
// of one KV head), served together: each block of 16 keys is loaded (an int8 cache's rows converted) once for all
// of them, their exponentials are computed 16 at a time (cpu_expf.h: the library's bits), and each V row is loaded
// once for a group of queries whose sums stay in registers.  Each query's own arithmetic is attend_keys's, in its
// order - scores 16 keys at a time summed as sum16, the tail's by row_dot, their maximum, exponentials summed key
// by key, V rows weighted by e / sum key by key - so a query has the same bits whatever else its tile holds.
constexpr int TILE = 16;

struct Query {
    const float* q;
    float* out;
    int64_t seen;  // keys it attends: the first `seen` of the walk's
};

// rows j0 .. j0 + m of a block as float32 rows: a float32 cache's where they lie, an int8 cache's converted into buf
template <typename Row>
void block_rows(const Row* k, int64_t j0, int64_t m, int64_t D, float* buf, const float* rows[16]) {
    for (int64_t t = 0; t < m; ++t) {
        if constexpr (std::is_same_v<Row, Floats>) {
            rows[t] = k[j0 + t].p;
        } else {
            for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(buf + t * D + c, k[j0 + t].load16(c));
            rows[t] = buf + t * D;
        }
    }
}

// scores[i][j] = q_i . k_j * scale for j < seen_i; the maximum of each query's scores into mx[i]
template <int C, typename Row>
void tile_scores(const Query* qs, int nq, const Row* k, int64_t n, float scale, float* scores, float* mx,
                 float* buf) {
    constexpr int64_t D = 16 * C;
    __m512 mv[TILE];
    for (int i = 0; i < nq; ++i) mv[i] = _mm512_set1_ps(-INFINITY);
    const float* rows[16];
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - j0);
        for (int64_t t = j0 + KEYS_AHEAD; t < std::min(j0 + KEYS_AHEAD + 16, n); ++t)
            disagg_blocks::fetch_ahead(k[t].p, 0, Row::bytes(D));
        block_rows(k, j0, m, D, buf, rows);
        for (int i = 0; i < nq; ++i) {
            const int64_t seen = qs[i].seen;
            float* sc = scores + i * n;
            if (j0 + 16 <= seen) {
                __m512 part[16], qc[C];
                for (int c = 0; c < C; ++c) qc[c] = _mm512_loadu_ps(qs[i].q + 16 * c);
                for (int t = 0; t < 16; ++t) part[t] = _mm512_setzero_ps();
                for (int c = 0; c < C; ++c)
                    for (int t = 0; t < 16; ++t)
                        part[t] = _mm512_fmadd_ps(qc[c], _mm512_loadu_ps(rows[t] + 16 * c), part[t]);
                const __m512 s = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
                _mm512_storeu_ps(sc + j0, s);
                mv[i] = _mm512_max_ps(mv[i], s);
            } else {
                for (int64_t j = j0; j < seen; ++j) sc[j] = row_dot(qs[i].q, Floats{rows[j - j0]}, D) * scale;
            }
        }
    }
    for (int i = 0; i < nq; ++i) {  // the full blocks' maximum, then the tail's keys one by one
        float m = _mm512_reduce_max_ps(mv[i]);
        const float* sc = scores + i * n;
        for (int64_t j = qs[i].seen / 16 * 16; j < qs[i].seen; ++j) m = sc[j] > m ? sc[j] : m;
        mx[i] = m;
    }
}

// scores[i][j] -> exp(scores - mx) / sum, each query's sum taken key by key
inline void tile_softmax(const Query* qs, int nq, int64_t n, float* scores, const float* mx) {
    float sums[TILE] = {};
    int64_t common = n;
    for (int i = 0; i < nq; ++i) {
        disagg_expf::exp_shifted(scores + i * n, qs[i].seen, mx[i]);
        common = std::min(common, qs[i].seen);
    }
    for (int64_t j = 0; j < common; ++j)  // the queries' sums side by side: nq chains of dependent adds
        for (int i = 0; i < nq; ++i) sums[i] += scores[i * n + j];
    for (int i = 0; i < nq; ++i) {
        float* e = scores + i * n;
        for (int64_t j = common; j < qs[i].seen; ++j) sums[i] += e[j];
        const __m512 s = _mm512_set1_ps(sums[i]);
        for (int64_t j = 0; j < qs[i].seen; j += 16) {
            const __mmask16 in = disagg_blocks::lanes16(qs[i].seen - j);
            _mm512_mask_storeu_ps(e + j, in, _mm512_div_ps(_mm512_maskz_loadu_ps(in, e + j), s));
        }
    }
}

template <int C, int G, typename Row>  // weigh_group for g <= G queries, g known at run time
void weigh_some(int g, const float* const p[], const Row* v, int64_t from, int64_t to, float* const out[]) {
    if constexpr (G > 1)
        if (g < G) return weigh_some<C, G - 1>(g, p, v, from, to, out);
    weigh_group<C, G>(p, v, from, to, out);
}

template <int C, int G, typename Row>  // groups of G queries over their common keys, then each query's own tail
void tile_weigh(const Query* qs, int nq, const Row* v, int64_t n, const float* probs) {
    for (int i = 0; i < nq; ++i) std::fill(qs[i].out, qs[i].out + 16 * C, 0.0f);
    for (int i0 = 0; i0 < nq; i0 += G) {
        const int g = std::min(G, nq - i0);
        const float* p[G];
        float* out[G];
        int64_t common = n;
        for (int i = 0; i < g; ++i) {
            p[i] = probs + (i0 + i) * n, out[i] = qs[i0 + i].out;
            common = std::min(common, qs[i0 + i].seen);
        }
        weigh_some<C, G>(g, p, v, 0, common, out);
        for (int i = 0; i < g; ++i) weigh_group<C, 1>(p + i, v, common, qs[i0 + i].seen, out + i);
    }
}

// the tile's queries over the walk's keys (k[j], v[j], j < n); scores: TILE x n floats, buf: 16 x D
template <int C, typename Row>
void attend_tile(const Query* qs, int nq, const Row* k, const Row* v, int64_t n, float scale, float* scores,
                 float* buf) {
    float mx[TILE];
    tile_scores<C>(qs, nq, k, n, scale, scores, mx, buf);
    tile_softmax(qs, nq, n, scores, mx);
    tile_weigh<C, (C >= 8 ? 3 : C >= 4 ? 6 : 8)>(qs, nq, v, n, scores);
}

// whether a head size takes the tiles (else attend_keys, per query)
inline bool tiles_for(int64_t D) { return D == 16 || D == 32 || D == 64 || D == 128; }

template <typename Row>
void attend_tile_any(const Query* qs, int nq, const Row* k, const Row* v, int64_t n, int64_t D, float scale,
                     float* scores, float* buf) {
    switch (D) {
        case 16: return attend_tile<1>(qs, nq, k, v, n, scale, scores, buf);
        case 32: return attend_tile<2>(qs, nq, k, v, n, scale, scores, buf);
        case 64: return attend_tile<4>(qs, nq, k, v, n, scale, scores, buf);
        default: return attend_tile<8>(qs, nq, k, v, n, scale, scores, buf);
    }
}
#else
constexpr int TILE = 1;
inline bool tiles_for(int64_t) { return false; }  // per query: attend_keys
#endif

}  // namespace
