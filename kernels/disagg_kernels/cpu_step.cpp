// A whole decoder stack for a few tokens in one call: the CPU step for block-quantized weights.
//
// Every token is a query row of its own (a decode token, a proposed token under verification, a short prefill
// chunk's token) with its position, its cache slot, its sequence's block-table row, and attention over the first
// position + 1 slots of that sequence.  Per layer: RMSNorm, fused QKV (+ bias), rotate-half RoPE, K/V written to
// the paged cache, attention per token and head, O, residual, RMSNorm, fused gate/up, SiLU * up, down, residual;
// the final norm at the end.  The same arithmetic as the torch path (float32 throughout, but for an int8 cache's
// K and V, rounded as KVFormat rounds them; the matmuls are cpu_quant.cpp's block kernels), in another summation
// order.  One call instead of ~20 torch ops a layer: at
// batch 1 those ops cost more than the weights' matmuls (docs/benchmarks.md).
//
// Built with cpu_quant.cpp into one library (cpu_quant.py); layouts are described by the structs below, which
// cpu_step.py mirrors with ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_blocks.h"
#include "cpu_kv8.h"
#include "cpu_step_attention.h"
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
extern "C" void disagg_logits_scan(const float* x, int64_t B, int64_t V, int64_t* argmax, uint8_t* finite,
                                   int threads);

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
    // the paged cache [blocks, layers, 2, block_size, kv_heads, width] by its strides (in elements): float32 with
    // width = head_dim, or (kv_int8) bytes with width = head_dim + 2 (cpu_kv8.h): head_dim int8 values and
    // their float16 scale (engine/kv_format.py's int8)
    void* kv;
    int64_t stride_block, stride_layer, stride_kv, stride_slot, stride_head;
    int64_t kv_int8;
};

}  // extern "C"

namespace {

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w
void rms_norm(const float* x, const float* w, int64_t T, int64_t H, float eps, float* out) {
    for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * H;
        const float inv = 1.0f / std::sqrt(row_dot(xt, Floats{xt}, H) / static_cast<float>(H) + eps);
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

// exponentials that pay for a fork and join (~1-2 us): ~1,000 scalar calls, ~16 times that in vector lanes (the
// default model's decode row has 1,536)
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr int64_t SILU_SPLIT_MIN = 16384;
#else
constexpr int64_t SILU_SPLIT_MIN = 1024;
#endif

struct Token {
    int64_t position;
    const int32_t* table;  // its sequence's block ids: slot = table[position / block_size] * block_size + ...
};

template <typename E>  // the cache's element type: float, or uint8_t for an int8 cache
inline E* kv_at(const DisaggStack& s, int64_t layer, int which, const int32_t* table, int64_t pos) {
    const int64_t block = table[pos / s.block_size];
    return static_cast<E*>(s.kv) + block * s.stride_block + layer * s.stride_layer + which * s.stride_kv +
           (pos % s.block_size) * s.stride_slot;
}

// a token's K (which 0) or V (1) row of KV head h into the cache: as it is, or encoded (an int8 cache)
inline void store_row(const DisaggStack& s, int64_t l, int which, const Token& tok, int64_t h, const float* row) {
    const int64_t D = s.head_dim, at = h * s.stride_head;
    if (s.kv_int8) encode_int8(row, D, kv_at<uint8_t>(s, l, which, tok.table, tok.position) + at);
    else std::memcpy(kv_at<float>(s, l, which, tok.table, tok.position) + at, row, static_cast<size_t>(D) * 4);
}

// Attention.  The queries that read the same keys - the query heads of one KV head (GQA) and the tokens of one
// sequence in this step (a prompt chunk, a proposal under verification) - are served by one walk over the keys, so
// each K and V row comes from memory once per walk instead of once per query (a step's walks are shared out among
// the threads, a prompt chunk's cut into tiles of its tokens, the last and longest first; a group is cut into
// parts where there are fewer groups than threads: cut where there were fewer than twice the threads, the default
// model's batch-1 decode step on 2 threads (3 KV heads: 3 groups) walked each KV head's rows twice, and took 3%
// longer at 2,000 slots).  A step shares its walks out from ATTENTION_SPLIT_MIN query-key pairs: a fork and join
// costs about what 256 do, and with 4,096 that model's batch-1 step (9 query heads) attended on one thread, the
// other waiting, up to 455 slots (a step at 300 slots took 11% longer).  On AVX-512 a walk's queries go through
// the keys together (attend_tile: each key block loaded once for up to TILE queries); elsewhere one by one
// (attend_keys).
// Each query's arithmetic is the plain two-pass softmax, in the same order whatever the walk: scores q . k (16
// keys at a time, each dot summed in `row_dot`'s order), their maximum, exponentials (the C library's bits,
// cpu_expf.h) summed key by key, then the V rows weighted by e / sum, key by key.  A token's attention is then the
// same bits whatever else the step holds, and (built with g++, which contracts `a += p * v` into an FMA and sums
// _mm512_reduce_add_ps as sum16 does) the bits of the per-query loop this replaced.
constexpr int64_t ATTENTION_SPLIT_MIN = 256;

struct Walk {  // one work item: tokens [first, first + count) of `order` (one sequence), query heads of one KV head
    int64_t first, count, kv_head, head_begin, head_end;
};

struct Scratch {  // a thread's, reused across walks
    std::vector<Floats> floats;  // the walk's K rows, then its V rows: a float32 cache's
    std::vector<Int8s> int8s;  // or an int8 cache's
    std::vector<float> scores;  // attend_keys's: n; a tile's: TILE x n
    std::vector<float> buf;  // a tile's block of 16 keys, converted (an int8 cache)
};

// the walk's K and V rows (rows[j], rows[n + j], j < n) as Row reads them, then every query of the walk over them
template <typename Row, typename Take>
void walk_rows(const DisaggStack& s, int64_t layer, const std::vector<Token>& toks, const int64_t* order,
               const Walk& w, int64_t n, const float* qkv, int64_t width, float scale, float* attn,
               std::vector<Row>& rows, Scratch& scratch, Take take) {
    using Elem = std::conditional_t<std::is_same_v<Row, Floats>, float, uint8_t>;
    const int64_t D = s.head_dim, bs = s.block_size, qs = s.heads * D;
    rows.resize(static_cast<size_t>(2 * n));
    const int32_t* table = toks[order[w.first]].table;
    const int64_t row_bytes = Row::bytes(D);
    for (int64_t j0 = 0; j0 < n; j0 += bs) {  // a block at a time: no division per slot
        const Elem* kp = kv_at<Elem>(s, layer, 0, table, j0) + w.kv_head * s.stride_head;
        const Elem* vp = kv_at<Elem>(s, layer, 1, table, j0) + w.kv_head * s.stride_head;
        for (int64_t j = j0; j < std::min(j0 + bs, n); ++j, kp += s.stride_slot, vp += s.stride_slot) {
            // the first keys' rows requested now: after a layer's weights streamed through, the cache is cold,
            // and on AVX-512 the walk below fetches rows only KEYS_AHEAD keys ahead of the one it reads
            if (j < KEYS_AHEAD)
                disagg_blocks::fetch_ahead(kp, 0, row_bytes), disagg_blocks::fetch_ahead(vp, 0, row_bytes);
            rows[j] = take(kp), rows[n + j] = take(vp);
        }
    }
#if defined(__AVX512F__)
    if (tiles_for(D)) {
        scratch.scores.resize(static_cast<size_t>(TILE * n));
        scratch.buf.resize(static_cast<size_t>(16 * D));
        Query tile[TILE];
        int nq = 0;
        for (int64_t a = 0; a < w.count; ++a) {
            const int64_t t = order[w.first + a], seen = toks[t].position + 1;  // causal: up to its own slot
            for (int64_t h = w.head_begin; h < w.head_end; ++h) {
                tile[nq++] = Query{qkv + t * width + h * D, attn + t * qs + h * D, seen};
                if (nq == TILE || (a + 1 == w.count && h + 1 == w.head_end)) {
                    attend_tile_any(tile, nq, rows.data(), rows.data() + n, n, D, scale, scratch.scores.data(),
                                    scratch.buf.data());
                    nq = 0;
                }
            }
        }
        return;
    }
#endif
    scratch.scores.resize(static_cast<size_t>(n));
    for (int64_t a = 0; a < w.count; ++a) {
        const int64_t t = order[w.first + a], seen = toks[t].position + 1;  // causal: up to its own slot
        for (int64_t h = w.head_begin; h < w.head_end; ++h)
            attend_keys(qkv + t * width + h * D, rows.data(), rows.data() + n, seen, D, scale,
                        scratch.scores.data(), attn + t * qs + h * D);
    }
}

void walk_keys(const DisaggStack& s, int64_t layer, const std::vector<Token>& toks, const int64_t* order,
               const Walk& w, const float* qkv, int64_t width, float scale, float* attn, Scratch& scratch) {
    int64_t n = 0;  // the walk's slots: up to its last token's position
    for (int64_t a = 0; a < w.count; ++a) n = std::max(n, toks[order[w.first + a]].position + 1);
    const int64_t D = s.head_dim;
    if (s.kv_int8)
        walk_rows(s, layer, toks, order, w, n, qkv, width, scale, attn, scratch.int8s, scratch,
                  [D](const uint8_t* row) { return int8_row(row, D); });
    else
        walk_rows(s, layer, toks, order, w, n, qkv, width, scale, attn, scratch.floats, scratch,
                  [](const float* row) { return Floats{row}; });
}

void attention_block(const DisaggStack& s, int64_t l, const std::vector<Token>& toks, const int64_t* seq,
                     float* qkv, const float* cos, const float* sin, float* attn, int threads) {
    const int64_t T = static_cast<int64_t>(toks.size()), D = s.head_dim;
    const int64_t qs = s.heads * D, kvs = s.kv_heads * D, width = qs + 2 * kvs, group = s.heads / s.kv_heads;
    for (int64_t t = 0; t < T; ++t) {  // rotate q and k, then write k and v of every token before any attends
        float* row = qkv + t * width;
        rope(row, s.heads + s.kv_heads, D, cos + t * D, sin + t * D);
        for (int64_t h = 0; h < s.kv_heads; ++h) {
            store_row(s, l, 0, toks[t], h, row + qs + h * D);
            store_row(s, l, 1, toks[t], h, row + qs + kvs + h * D);
        }
    }
    // tokens ordered by sequence (their rows of the step's block tables); one group per sequence and KV head
    std::vector<int64_t> order(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [seq](int64_t a, int64_t b) { return seq[a] < seq[b]; });
    std::vector<std::pair<int64_t, int64_t>> runs;  // (first, count) per sequence
    int64_t work = 0;
    for (int64_t i = 0; i < T;) {
        int64_t n = 1;
        while (i + n < T && seq[order[i + n]] == seq[order[i]]) ++n;
        runs.emplace_back(i, n);
        for (int64_t a = 0; a < n; ++a) work += s.heads * (toks[order[i + a]].position + 1);
        i += n;
    }
    const int64_t groups = static_cast<int64_t>(runs.size()) * s.kv_heads;
    const int64_t parts = std::min(group, std::max<int64_t>(1, (threads + groups - 1) / groups));
    std::vector<Walk> walks;
    for (const auto& [first, count] : runs)
        for (int64_t h = 0; h < s.kv_heads; ++h)
            for (int64_t p = 0; p < parts; ++p) {  // the group's query heads, cut into `parts`
                const int64_t begin = h * group + group * p / parts, end = h * group + group * (p + 1) / parts;
                // a walk per tile of its tokens (a prompt chunk's), so later tokens' walks read only their keys
                const int64_t step = tiles_for(D) ? std::max<int64_t>(1, TILE / (end - begin)) : count;
                for (int64_t a = 0; a < count; a += step)
                    walks.push_back(Walk{first + a, std::min(step, count - a), h, begin, end});
            }
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t nw = static_cast<int64_t>(walks.size());
#pragma omp parallel num_threads(threads) if (work >= ATTENTION_SPLIT_MIN)
    {
        Scratch scratch;
#pragma omp for schedule(dynamic)
        for (int64_t w = nw - 1; w >= 0; --w)  // a chunk's last tokens first: they have the most keys
            walk_keys(s, l, toks, order.data(), walks[w], qkv, width, scale, attn, scratch);
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
        // T x I exponentials, 16 at a time, split among the threads where there are enough to pay for a fork and
        // join (SILU_SPLIT_MIN)
        const int64_t spans = (I + 15) / 16;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (T * I >= SILU_SPLIT_MIN)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t b = 0; b < spans; ++b)
                disagg_expf::silu_times(gu.data() + t * 2 * I + 16 * b, gu.data() + t * 2 * I + I + 16 * b,
                                        std::min<int64_t>(16, I - 16 * b), act.data() + t * I + 16 * b);
        linear(s, L.down, act.data(), T, proj.data(), threads);
        for (int64_t i = 0; i < T * H; ++i) hidden[i] += proj[i];
    }
    rms_norm(hidden, s.final_norm, T, H, s.eps, normed.data());
    for (int64_t i = 0; i < T * H; ++i) hidden[i] = normed[i];
}

// The step, then its logits: the LM head `head` (packed panels: the int16 product QuantLinear computes) over the
// final-normed hidden states of the P tokens `pick` into logits [P, head->n], and each row's scan (cpu_logits.cpp:
// its first maximum, whether it is finite).  One call where the step, the row gather, the head and the scan were
// four: at batch 1 each torch or ctypes call after a pass over the weights starts from cold caches (~0.1 ms).
void disagg_stack_logits(const DisaggStack* stack, float* hidden, int64_t T, const int64_t* positions,
                         const int32_t* tables, int64_t table_width, const int64_t* rows, int threads,
                         const DisaggMat* head, const int64_t* pick, int64_t P, float* logits, int64_t* argmax,
                         uint8_t* finite) {
    disagg_stack_forward(stack, hidden, T, positions, tables, table_width, rows, threads);
    const int64_t H = stack->hidden;
    std::vector<float> x(static_cast<size_t>(P * H));
    for (int64_t p = 0; p < P; ++p)
        std::memcpy(x.data() + p * H, hidden + pick[p] * H, static_cast<size_t>(H) * sizeof(float));
    linear(*stack, *head, x.data(), P, logits, threads);
    disagg_logits_scan(logits, P, head->n, argmax, finite, threads);
}

}  // extern "C"
