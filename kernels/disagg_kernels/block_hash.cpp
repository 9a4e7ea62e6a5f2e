// A prompt's chained block hashes in one call (disagg/router/prompt_hash.py), bit for bit those of
// disagg/protocol.py's `hash_prompt_blocks`, the reference it is tested against: block i's hash is BLAKE2b with an
// 8-byte digest over (the parent's 8 bytes, little-endian, or the 16-byte root for the first block) followed by
// the block's token ids as little-endian int32; read back as a little-endian integer.
//
// Why native: the router hashes every request's prompt before routing it.  In Python each block costs a slice,
// a concatenation, a hash object and an int conversion, ~1 us a block: ~30 us of a 256-worker decision's ~70
// (docs/benchmarks.md, "Decision latency at scale").  BLAKE2b here is RFC 7693's reference algorithm.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr uint64_t kIv[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                             0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                             0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

// One G of a round, on the working variables held in locals (a round's 8 of them index the message by the
// constant sigma row r: the compiler resolves every index, so the 12 rounds unroll into straight-line code).
#define G(r, i, a, b, c, d)                  \
  a = a + b + m[kSigma[r][2 * (i)]];         \
  d = rotr(d ^ a, 32);                       \
  c = c + d;                                 \
  b = rotr(b ^ c, 24);                       \
  a = a + b + m[kSigma[r][2 * (i) + 1]];     \
  d = rotr(d ^ a, 16);                       \
  c = c + d;                                 \
  b = rotr(b ^ c, 63);
#define ROUND(r)                   \
  G(r, 0, v0, v4, v8, v12)         \
  G(r, 1, v1, v5, v9, v13)         \
  G(r, 2, v2, v6, v10, v14)        \
  G(r, 3, v3, v7, v11, v15)        \
  G(r, 4, v0, v5, v10, v15)        \
  G(r, 5, v1, v6, v11, v12)        \
  G(r, 6, v2, v7, v8, v13)         \
  G(r, 7, v3, v4, v9, v14)

void compress(uint64_t h[8], const uint8_t* block, uint64_t counter, bool last) {
  uint64_t m[16];
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(m, block, sizeof(m));
#else
  for (int i = 0; i < 16; ++i) {  // little-endian words, whatever the machine's order
    m[i] = 0;
    for (int k = 7; k >= 0; --k) m[i] = (m[i] << 8) | block[8 * i + k];
  }
#endif
  uint64_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
  uint64_t v8 = kIv[0], v9 = kIv[1], v10 = kIv[2], v11 = kIv[3];
  uint64_t v12 = kIv[4] ^ counter;  // (messages here are far below 2^64 bytes: the counter's high word stays 0)
  uint64_t v13 = kIv[5], v14 = last ? ~kIv[6] : kIv[6], v15 = kIv[7];
  ROUND(0) ROUND(1) ROUND(2) ROUND(3) ROUND(4) ROUND(5) ROUND(6) ROUND(7) ROUND(8) ROUND(9) ROUND(10) ROUND(11)
  h[0] ^= v0 ^ v8;
  h[1] ^= v1 ^ v9;
  h[2] ^= v2 ^ v10;
  h[3] ^= v3 ^ v11;
  h[4] ^= v4 ^ v12;
  h[5] ^= v5 ^ v13;
  h[6] ^= v6 ^ v14;
  h[7] ^= v7 ^ v15;
}
#undef ROUND
#undef G

// BLAKE2b, no key, an 8-byte digest, of a non-empty message: the digest as a little-endian integer (h[0]).
uint64_t blake2b_64(const uint8_t* msg, size_t len) {
  uint64_t h[8];
  std::memcpy(h, kIv, sizeof(h));
  h[0] ^= 0x01010000ULL ^ 8;  // parameter block: depth 1, fanout 1, no key, digest length 8
  size_t done = 0;
  while (len - done > 128) {
    compress(h, msg + done, done + 128, false);
    done += 128;
  }
  uint8_t last[128] = {0};
  std::memcpy(last, msg + done, len - done);
  compress(h, last, len, true);
  return h[0];
}

}  // namespace

extern "C" {

// The chained hashes of `blocks` blocks of `block_size` token ids each, given as little-endian int32 (what
// struct.pack("<i") writes): the first block's parent is `root` (`root_len` bytes: the 16-byte root, or a salt's
// 8-byte hash), each next one's the previous hash.
void bh_chain(const uint8_t* root, int64_t root_len, const uint8_t* tokens, int64_t blocks, int64_t block_size,
              uint64_t* out) {
  const size_t body = 4 * static_cast<size_t>(block_size);
  std::vector<uint8_t> msg(std::max<size_t>(static_cast<size_t>(root_len), 8) + body);
  std::memcpy(msg.data(), root, root_len);
  size_t head = static_cast<size_t>(root_len);
  for (int64_t b = 0; b < blocks; ++b) {
    std::memcpy(msg.data() + head, tokens + b * body, body);
    const uint64_t h = blake2b_64(msg.data(), head + body);
    out[b] = h;
    for (int i = 0; i < 8; ++i) msg[i] = static_cast<uint8_t>(h >> (8 * i));  // the next parent, little-endian
    head = 8;
  }
}

}  // extern "C"
