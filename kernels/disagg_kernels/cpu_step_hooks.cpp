// The native step's parts, callable alone: for tests, which hold them to their references bit for bit (the
// exponentials to the C library's, the tiled attention to attend_keys, the int8 cache codec to KVFormat's bytes).
// Nothing in the serving path calls these.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_expf.h"
#include "cpu_kv8.h"
#include "cpu_step_attention.h"

extern "C" {

// out[i] = exp(x[i]) as the step computes it (cpu_expf.h: vector lanes where built, a masked or scalar tail), and
// as the C library does
void disagg_step_expf(const float* x, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i];
    disagg_expf::exp_shifted(out, n, 0.0f);  // x - 0 is x, -0 and NaN included
}

void disagg_library_expf(const float* x, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i]);
}

// out[i] = silu(g[i]) * up[i] as the step computes it, 16 at a time
void disagg_step_silu(const float* g, const float* up, int64_t n, float* out) {
    for (int64_t i = 0; i < n; i += 16)
        disagg_expf::silu_times(g + i, up + i, std::min<int64_t>(16, n - i), out + i);
}

// nq queries q [nq, D] over n keys (k and v: [n, D] float32 rows, or with kv_int8 [n, D + 2] int8 rows), query i
// over the first seen[i]: by the step's tiles where built (tiled != 0), else query by query (attend_keys)
void disagg_attend(int tiled, int kv_int8, const float* q, int64_t nq, const int64_t* seen, const void* k,
                   const void* v, int64_t n, int64_t D, float scale, float* out) {
    std::vector<float> scores(static_cast<size_t>(16 * n)), buf(static_cast<size_t>(16 * D));
    auto run = [&](auto& rows) {
#if defined(__AVX512F__)
        if (tiled && tiles_for(D)) {
            for (int64_t i0 = 0; i0 < nq; i0 += TILE) {
                Query tile[TILE];
                const int m = static_cast<int>(std::min<int64_t>(TILE, nq - i0));
                for (int i = 0; i < m; ++i) tile[i] = Query{q + (i0 + i) * D, out + (i0 + i) * D, seen[i0 + i]};
                attend_tile_any(tile, m, rows.data(), rows.data() + n, n, D, scale, scores.data(), buf.data());
            }
            return;
        }
#endif
        for (int64_t i = 0; i < nq; ++i)
            attend_keys(q + i * D, rows.data(), rows.data() + n, seen[i], D, scale, scores.data(), out + i * D);
    };
    if (kv_int8) {
        std::vector<Int8s> rows(static_cast<size_t>(2 * n));
        for (int64_t j = 0; j < n; ++j) {
            rows[j] = int8_row(static_cast<const uint8_t*>(k) + j * (D + KV8_SCALE_BYTES), D);
            rows[n + j] = int8_row(static_cast<const uint8_t*>(v) + j * (D + KV8_SCALE_BYTES), D);
        }
        run(rows);
    } else {
        std::vector<Floats> rows(static_cast<size_t>(2 * n));
        for (int64_t j = 0; j < n; ++j)
            rows[j] = Floats{static_cast<const float*>(k) + j * D},
            rows[n + j] = Floats{static_cast<const float*>(v) + j * D};
        run(rows);
    }
}

// `rows` heads of D values into engine/kv_format.py's int8 format (D + 2 bytes each), and back to float32: the
// codec the step writes and reads its cache with (tests hold it to KVFormat byte for byte)
void disagg_kv8_encode(const float* x, int64_t rows, int64_t D, uint8_t* out) {
    for (int64_t r = 0; r < rows; ++r) encode_int8(x + r * D, D, out + r * (D + KV8_SCALE_BYTES));
}

void disagg_kv8_decode(const uint8_t* in, int64_t rows, int64_t D, float* out) {
    for (int64_t r = 0; r < rows; ++r) decode_int8(in + r * (D + KV8_SCALE_BYTES), D, out + r * D);
}

}  // extern "C"
