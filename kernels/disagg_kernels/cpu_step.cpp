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

// attention of one token and one query head over its sequence's first position + 1 slots
void attend(const DisaggStack& s, int64_t layer, const Token& tok, const float* q, int64_t kv_head, float scale,
            float* scores, float* out) {
    const int64_t D = s.head_dim, len = tok.position + 1, bs = s.block_size;
    // the slots are walked a block at a time: no division per position (kv_at's), the same arithmetic
    float mx = -INFINITY;
    for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const float* k = kv_at(s, layer, 0, tok.table, j0) + kv_head * s.stride_head;
        for (int64_t j = j0; j < j0 + bs && j < len; ++j, k += s.stride_slot) {
            scores[j] = dot(q, k, D) * scale;
            mx = scores[j] > mx ? scores[j] : mx;
        }
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < len; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
    for (int64_t i = 0; i < D; ++i) out[i] = 0.0f;
    for (int64_t j0 = 0; j0 < len; j0 += bs) {
        const float* v = kv_at(s, layer, 1, tok.table, j0) + kv_head * s.stride_head;
        for (int64_t j = j0; j < j0 + bs && j < len; ++j, v += s.stride_slot) {
            const float p = scores[j] / sum;
            for (int64_t i = 0; i < D; ++i) out[i] += p * v[i];
        }
    }
}

void attention_block(const DisaggStack& s, int64_t l, const std::vector<Token>& toks, float* qkv,
                     const float* cos, const float* sin, float* attn, int threads) {
    const int64_t T = static_cast<int64_t>(toks.size()), D = s.head_dim;
    const int64_t qs = s.heads * D, kvs = s.kv_heads * D, width = qs + 2 * kvs;
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
    int64_t longest = 0;
    for (const Token& tok : toks) longest = tok.position + 1 > longest ? tok.position + 1 : longest;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t group = s.heads / s.kv_heads, work = T * s.heads;
#pragma omp parallel num_threads(threads) if (work * longest > 4096)
    {
        std::vector<float> scores(static_cast<size_t>(longest));
#pragma omp for schedule(static)
        for (int64_t w = 0; w < work; ++w) {
            const int64_t t = w / s.heads, h = w % s.heads;
            attend(s, l, toks[t], qkv + t * width + h * D, h / group, scale, scores.data(), attn + t * qs + h * D);
        }
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
        attention_block(s, l, toks, qkv.data(), cos.data(), sin.data(), attn.data(), threads);
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
