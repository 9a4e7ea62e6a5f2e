// The int8 KV cache's codec for the native step (cpu_step.cpp): engine/kv_format.py's int8 format, a token's head as
// head_dim int8 values and their float16 scale, written and read with the same bits as KVFormat.encode / decode
// (tests/test_native_kv8.py holds them to it).  The build key of the library (native_build.py) covers this header.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t KV8_SCALE_BYTES = 2;  // kv_format.py's SCALE_BYTES: a float16 per token and head

// float16 <-> float32, rounding to nearest even (Maratyszcza's FP16 conversions): the cache's scales are float16
inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
}
inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}
inline uint16_t half_from_float(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline float float_from_half(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

// A token's head into an int8 cache as engine/kv_format.py's KVFormat.encode writes it, byte for byte: scale =
// max|x| / 127 (at least float16's smallest subnormal) rounded to float16, values = round-half-even(x / scale)
// clamped to +-127, then the scale's two bytes.  A NaN in x makes the scale NaN (torch's amax propagates it), so
// a NaN is not rounded away: the attention that reads it gives NaN, which the runner catches.
inline void encode_int8(const float* x, int64_t D, uint8_t* out) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
        const float a = std::fabs(x[i]);
        amax = (a > amax || std::isnan(a)) ? a : amax;
    }
    float scale = amax / 127.0f;
    scale = scale < 0x1.0p-24f ? 0x1.0p-24f : scale;  // clamp_min: a NaN stays NaN
    const uint16_t h = half_from_float(scale);
    const float sf = float_from_half(h);
    for (int64_t i = 0; i < D; ++i) {
        float v = std::nearbyint(x[i] / sf);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        out[i] = std::isnan(v) ? 0 : static_cast<uint8_t>(static_cast<int8_t>(v));  // NaN: the scale says it
    }
    static_assert(sizeof(uint16_t) == KV8_SCALE_BYTES);
    std::memcpy(out + D, &h, sizeof(h));
}

inline void decode_int8(const uint8_t* in, int64_t D, float* out) {  // values.float() * scale.float()
    uint16_t h;
    std::memcpy(&h, in + D, sizeof(h));
    const float sf = float_from_half(h);
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(static_cast<int8_t>(in[i])) * sf;
}

}  // namespace
