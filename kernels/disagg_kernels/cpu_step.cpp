// A whole decoder stack for a few tokens in one call: the CPU step for block-quantized weights.
//
// Every token is a query row of its own (a decode token, a proposed token under verification, a short prefill
// chunk's token) with its position, its cache slot, its sequence's block-table row, and attention over the first
// position + 1 slots of that sequence.  Per layer: RMSNorm, fused QKV (+ bias), rotate-half RoPE, K/V written to
// the paged cache, attention per token and head, O, residual, RMSNorm, fused gate/up, SiLU * up, down, residual;
// the final norm at the end.  The same arithmetic as the torch path (float32 throughout; the matmuls are
// cpu_quant.cpp's block kernels), in another summation order.  One call instead of ~20 torch ops a layer: at
// batch 1 those ops cost more than the weights' matmuls (docs/benchmarks.md).
//
// Built with cpu_quant.cpp into one library (cpu_quant.py); layouts are described by the structs below, which
// cpu_step.py mirrors with ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

extern "C" void disagg_quant_matmul(int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs,
                                    const float* d, const float* m, int64_t N, float* y, int threads);
extern "C" void disagg_quant_matmul_int(int bits, int codes, const float* x, int64_t B, int64_t K,
                                        const uint8_t* qs, const float* d, const float* m, int64_t N, float* y,
                                        int threads);
extern "C" void disagg_quant_gemm_int(int bits, int codes, const float* x, int64_t B, int64_t K, const uint8_t* qs,
                                      const float* d, const float* m, int64_t N, float* y, int threads);
extern "C" void disagg_quant_panels_int16(int codes, const float* x, int64_t B, int64_t K, const uint8_t* panels,
                                          int64_t N, float* y, int threads);

extern "C" {

struct DisaggMat {  // one block matrix [n, k] (cpu_quant.cpp's codes) and its optional bias [n]
    int64_t codes, n, k;
    const uint8_t* qs;
    const float* d;
    const float* m;  // NULL: Q4_0 / Q8_0
    const float* bias;  // NULL: none
    const uint8_t* panels;  // NULL, or the matrix packed into panels (cpu_panel16.cpp; int16 activations; qs unused)
};

struct DisaggLayer {
    const float* input_norm;
    const float* post_norm;
    DisaggMat qkv, o, gate_up, down;
};

struct DisaggStack {
    int64_t num_layers, hidden, intermediate, heads, kv_heads, head_dim, block_size;
    int64_t activation_bits;  // 0: float32 activations; 8 / 16: the matmuls round x to int8 / int16 (cpu_dot8.cpp)
    int64_t blocked_rows;  // with activation_bits: steps of at least this many tokens take cpu_gemm8.cpp (0: never)
    float eps;
    const float* inv_freq;  // [head_dim / 2]
    const float* final_norm;
    const DisaggLayer* layers;
    // the paged cache, float32, in elements: [blocks, layers, 2, block_size, kv_heads, head_dim] by its strides
    float* kv;
    int64_t stride_block, stride_layer, stride_kv, stride_slot, stride_head;
};

}  // extern "C"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
#endif
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w
void rms_norm(const float* x, const float* w, int64_t T, int64_t H, float eps, float* out) {
    for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * H;
        const float inv = 1.0f / std::sqrt(dot(xt, xt, H) / static_cast<float>(H) + eps);
        for (int64_t i = 0; i < H; ++i) out[t * H + i] = xt[i] * inv * w[i];
    }
}

void linear(const DisaggStack& s, const DisaggMat& w, const float* x, int64_t T, float* y, int threads) {
    const int codes = static_cast<int>(w.codes);
    const int bits = static_cast<int>(s.activation_bits);
    if (w.panels) disagg_quant_panels_int16(codes, x, T, w.k, w.panels, w.n, y, threads);
    else if (bits && s.blocked_rows > 0 && T >= s.blocked_rows)
        disagg_quant_gemm_int(bits, codes, x, T, w.k, w.qs, w.d, w.m, w.n, y, threads);
    else if (bits) disagg_quant_matmul_int(bits, codes, x, T, w.k, w.qs, w.d, w.m, w.n, y, threads);
    else disagg_quant_matmul(codes, x, T, w.k, w.qs, w.d, w.m, w.n, y, threads);
    if (w.bias)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < w.n; ++j) y[t * w.n + j] += w.bias[j];
}

// rotate-half RoPE of `count` heads of one token, in place
void rope(float* x, int64_t count, int64_t D, const float* cos, const float* sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < count; ++h) {
        float* v = x + h * D;
        for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

struct Token {
    int64_t position;
    const int32_t* table;  // its sequence's block ids: slot = table[position / block_size] * block_size + ...
};

inline float* kv_at(const DisaggStack& s, int64_t layer, int which, const int32_t* table, int64_t pos) {
    const int64_t block = table[pos / s.block_size];
    return s.kv + block * s.stride_block + layer * s.stride_layer + which * s.stride_kv +
           (pos % s.block_size) * s.stride_slot;
}

// Attention, flash-decoding style.  The queries that read the same keys - the query heads of one KV head (GQA) and
// the tokens of one sequence in this step (a prompt chunk, a proposal under verification) - walk the keys
// together, so each K and V row is read once per step instead of once per query, and each walk covers a range of
// keys (a split), so that a step with few sequences still gives every thread work.  A query keeps a running
// maximum m, sum l and output acc (online softmax); the splits' partials are merged at the end.  Causal: a token
// sees the slots up to its own position.
struct Walk {  // one work item: a sequence's tokens (first, count in `order`), one KV head, slots [begin, end)
    int64_t first, count, kv_head, begin, end;
};

#if defined(__AVX512F__)
// exp(x) for 16 floats (cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, then 2^n): within 2 ulp of
// std::exp over the range softmax uses (x <= 0; below -87 it is 0)
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

inline __m512 unpack_lo64(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
inline __m512 unpack_hi64(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// lane i of the result: the sum of v[i]'s 16 lanes (a transposing tree: ~3 instructions a vector, not ~8)
inline __m512 sum16(const __m512 v[16]) {
    __m512 u[4];
    for (int q = 0; q < 4; ++q) {  // u[q], 128-bit block k, lane m: the sum of v[4 q + m]'s lanes 4 k .. 4 k + 3
        const __m512* w = v + 4 * q;
        const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        u[q] = _mm512_add_ps(unpack_lo64(a, b), unpack_hi64(a, b));
    }
    const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}
#endif

#if defined(__AVX512F__)
template <int C>  // acc[16 C] = sum over j < n of e[j] v[j], the accumulators in registers
void weighted_rows_c(const float* e, const float* const* v, int64_t n, float* acc) {
    __m512 a[C];
    for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const __m512 w = _mm512_set1_ps(e[j]);
        for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v[j] + 16 * c), a[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
}
#endif

// acc[D] = sum over j < n of e[j] v[j]
void weighted_rows(const float* e, const float* const* v, int64_t n, int64_t D, float* acc) {
#if defined(__AVX512F__)
    switch (D) {
        case 16: return weighted_rows_c<1>(e, v, n, acc);
        case 32: return weighted_rows_c<2>(e, v, n, acc);
        case 64: return weighted_rows_c<4>(e, v, n, acc);
        case 128: return weighted_rows_c<8>(e, v, n, acc);
        default: break;
    }
#endif
    for (int64_t i = 0; i < D; ++i) acc[i] = 0.0f;
    for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < D; ++i) acc[i] += e[j] * v[j][i];
}

// one query's partial over keys [0, n) of a walk (their K and V rows at k[j], v[j]; keys past `seen` are masked):
// two passes as softmax is written (scores and their maximum; exponentials, their sum and the weighted V rows)
void attend_keys(const float* q, const float* const* k, const float* const* v, int64_t n, int64_t seen, int64_t D,
                 float scale, float* scores, float* pq) {
    float m = -INFINITY, l = 0.0f;
    float* acc = pq + 2;
    int64_t j = 0;
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= seen; j += 16) {
            __m512 part[16];
            for (int64_t t = 0; t < 16; ++t) {
                part[t] = _mm512_setzero_ps();
                for (int64_t c = 0; c < D; c += 16)
                    part[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k[j + t] + c), part[t]);
            }
            const __m512 sc = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
            _mm512_storeu_ps(scores + j, sc);
            mv = _mm512_max_ps(mv, sc);
        }
        m = _mm512_reduce_max_ps(mv);
    }
#endif
    for (; j < seen; ++j) {
        scores[j] = dot(q, k[j], D) * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    j = 0;
#if defined(__AVX512F__)
    __m512 lv = _mm512_setzero_ps();
    for (; j + 16 <= seen; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(m)));
        _mm512_storeu_ps(scores + j, e);
        lv = _mm512_add_ps(lv, e);
    }
    l = _mm512_reduce_add_ps(lv);
#endif
    for (; j < seen; ++j) l += (scores[j] = std::exp(scores[j] - m));
    weighted_rows(scores, v, seen, D, acc);
    pq[0] = m;
    pq[1] = l;
    (void)n;
}

struct Scratch {  // a thread's, reused across walks
    std::vector<const float*> rows;
    std::vector<float> scores;
};

// the partials (m, l, acc[D]) of the walk's queries, token-major then head: count x group of them
void walk_keys(const DisaggStack& s, int64_t layer, const std::vector<Token>& toks, const int64_t* order,
               const Walk& w, const float* qkv, int64_t width, int64_t group, float scale, float* part,
               Scratch& scratch) {
    const int64_t D = s.head_dim, bs = s.block_size, n = w.end - w.begin, stride = D + 2;
    scratch.rows.resize(static_cast<size_t>(2 * n));
    scratch.scores.resize(static_cast<size_t>(n));
    const float** k = scratch.rows.data();  // the walk's K rows, then its V rows
    const float** v = k + n;
    float* scores = scratch.scores.data();
    const int32_t* table = toks[order[w.first]].table;
    for (int64_t j0 = w.begin; j0 < w.end; j0 = (j0 / bs + 1) * bs) {
        const float* kp = kv_at(s, layer, 0, table, j0) + w.kv_head * s.stride_head;
        const float* vp = kv_at(s, layer, 1, table, j0) + w.kv_head * s.stride_head;
        for (int64_t j = j0; j < std::min((j0 / bs + 1) * bs, w.end); ++j, kp += s.stride_slot, vp += s.stride_slot)
            k[j - w.begin] = kp, v[j - w.begin] = vp;
    }
    for (int64_t a = 0; a < w.count; ++a) {
        const int64_t t = order[w.first + a];
        const int64_t seen = std::max<int64_t>(0, std::min(w.end, toks[t].position + 1) - w.begin);  // causal
        for (int64_t g = 0; g < group; ++g) {
            float* pq = part + (a * group + g) * stride;
            if (seen == 0) {  // every slot of this walk lies after the token: nothing to add
                pq[0] = -INFINITY, pq[1] = 0.0f;
                continue;
            }
            attend_keys(qkv + t * width + (w.kv_head * group + g) * D, k, v, n, seen, D, scale, scores, pq);
        }
    }
}

void attention_block(const DisaggStack& s, int64_t l, const std::vector<Token>& toks, const int64_t* seq,
                     float* qkv, const float* cos, const float* sin, float* attn, int threads) {
    const int64_t T = static_cast<int64_t>(toks.size()), D = s.head_dim;
    const int64_t qs = s.heads * D, kvs = s.kv_heads * D, width = qs + 2 * kvs, group = s.heads / s.kv_heads;
    for (int64_t t = 0; t < T; ++t) {  // rotate q and k, then write k and v of every token before any attends
        float* row = qkv + t * width;
        rope(row, s.heads + s.kv_heads, D, cos + t * D, sin + t * D);
        for (int64_t h = 0; h < s.kv_heads; ++h) {
            float* k = kv_at(s, l, 0, toks[t].table, toks[t].position) + h * s.stride_head;
            float* v = kv_at(s, l, 1, toks[t].table, toks[t].position) + h * s.stride_head;
            for (int64_t i = 0; i < D; ++i) {
                k[i] = row[qs + h * D + i];
                v[i] = row[qs + kvs + h * D + i];
            }
        }
    }
    // tokens ordered by sequence (the step's table rows); a sequence's walks cover slots 0 .. its last position
    std::vector<int64_t> order(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [seq](int64_t a, int64_t b) { return seq[a] < seq[b]; });
    std::vector<Walk> walks;
    std::vector<int64_t> part_at;  // each walk's first partial, in floats
    int64_t seqs = 0;
    for (int64_t i = 0; i < T; ++i) seqs += i == 0 || seq[order[i]] != seq[order[i - 1]];
    const int64_t min_split = 256;  // slots: a walk shorter than this is not split (its merge would cost more)
    const int64_t want = std::max<int64_t>(1, (2 * threads + seqs * s.kv_heads - 1) / (seqs * s.kv_heads));
    int64_t floats = 0, work = 0;
    for (int64_t i = 0; i < T;) {
        int64_t n = 1, len = toks[order[i]].position + 1;
        while (i + n < T && seq[order[i + n]] == seq[order[i]]) len = std::max(len, toks[order[i + n++]].position + 1);
        const int64_t splits = std::min(want, std::max<int64_t>(1, len / min_split));
        for (int64_t h = 0; h < s.kv_heads; ++h)
            for (int64_t c = 0; c < splits; ++c) {
                walks.push_back(Walk{i, n, h, len * c / splits, len * (c + 1) / splits});
                part_at.push_back(floats);
                floats += n * group * (D + 2);
            }
        work += n * group * s.kv_heads * len;
        i += n;
    }
    std::vector<float> parts(static_cast<size_t>(floats));
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t nw = static_cast<int64_t>(walks.size());
#pragma omp parallel num_threads(threads) if (work > 4096)
    {
        Scratch scratch;
#pragma omp for schedule(dynamic)
        for (int64_t w = 0; w < nw; ++w)
            walk_keys(s, l, toks, order.data(), walks[w], qkv, width, group, scale, parts.data() + part_at[w], scratch);
    }
    // merge: walks of one sequence and KV head are consecutive
    for (int64_t w0 = 0; w0 < nw;) {
        int64_t w1 = w0 + 1;
        while (w1 < nw && walks[w1].first == walks[w0].first && walks[w1].kv_head == walks[w0].kv_head) ++w1;
        const Walk& walk = walks[w0];
        for (int64_t q = 0; q < walk.count * group; ++q) {
            const int64_t t = order[walk.first + q / group], h = walk.kv_head * group + q % group;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t w = w0; w < w1; ++w) m = std::max(m, parts[part_at[w] + q * (D + 2)]);
            float* out = attn + t * qs + h * D;
            for (int64_t i = 0; i < D; ++i) out[i] = 0.0f;
            for (int64_t w = w0; w < w1; ++w) {
                const float* pq = parts.data() + part_at[w] + q * (D + 2);
                if (pq[0] == -INFINITY) continue;  // a split wholly after this token's position
                const float c = std::exp(pq[0] - m);
                sum += pq[1] * c;
                for (int64_t i = 0; i < D; ++i) out[i] += pq[2 + i] * c;
            }
            for (int64_t i = 0; i < D; ++i) out[i] /= sum;
        }
        w0 = w1;
    }
}

}  // namespace

extern "C" {

// hidden [T, hidden]: the token embeddings in, the final-normed hidden states out.  positions: per token; rows:
// each token's row of `tables` ([rows, table_width] int32 block ids), where its K and V go and what it attends.
void disagg_stack_forward(const DisaggStack* stack, float* hidden, int64_t T, const int64_t* positions,
                          const int32_t* tables, int64_t table_width, const int64_t* rows, int threads) {
    const DisaggStack& s = *stack;
    const int64_t H = s.hidden, D = s.head_dim, half = D / 2, I = s.intermediate;
    const int64_t width = (s.heads + 2 * s.kv_heads) * D;
    std::vector<Token> toks(static_cast<size_t>(T));
    std::vector<float> cos(T * D), sin(T * D);
    for (int64_t t = 0; t < T; ++t) {
        toks[t] = Token{positions[t], tables + rows[t] * table_width};
        for (int64_t i = 0; i < half; ++i) {  // as the torch path: float(position) * inv_freq, then cos / sin
            const float f = static_cast<float>(positions[t]) * s.inv_freq[i];
            cos[t * D + i] = cos[t * D + i + half] = std::cos(f);
            sin[t * D + i] = sin[t * D + i + half] = std::sin(f);
        }
    }
    std::vector<float> normed(T * H), qkv(T * width), attn(T * s.heads * D), proj(T * H), gu(T * 2 * I), act(T * I);
    for (int64_t l = 0; l < s.num_layers; ++l) {
        const DisaggLayer& L = s.layers[l];
        rms_norm(hidden, L.input_norm, T, H, s.eps, normed.data());
        linear(s, L.qkv, normed.data(), T, qkv.data(), threads);
        attention_block(s, l, toks, rows, qkv.data(), cos.data(), sin.data(), attn.data(), threads);
        linear(s, L.o, attn.data(), T, proj.data(), threads);
        for (int64_t i = 0; i < T * H; ++i) hidden[i] += proj[i];
        rms_norm(hidden, L.post_norm, T, H, s.eps, normed.data());
        linear(s, L.gate_up, normed.data(), T, gu.data(), threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1)  // T x I exponentials: split the rows
        for (int64_t t = 0; t < T; ++t)
            for (int64_t i = 0; i < I; ++i) {
                const float g = gu[t * 2 * I + i];
                act[t * I + i] = g / (1.0f + std::exp(-g)) * gu[t * 2 * I + I + i];
            }
        linear(s, L.down, act.data(), T, proj.data(), threads);
        for (int64_t i = 0; i < T * H; ++i) hidden[i] += proj[i];
    }
    rms_norm(hidden, s.final_norm, T, H, s.eps, normed.data());
    for (int64_t i = 0; i < T * H; ++i) hidden[i] = normed[i];
}

}  // extern "C"
