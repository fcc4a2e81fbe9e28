#pragma once
// Counter-based Philox4x32-10 and the uniform -> Gumbel transform of gumbel_softmax, shared by
// the CPU and CUDA kernels (and reproduced by the Triton kernel with tl.rand itself).
//
// The stream is Triton's `tl.rand(seed, offset)`, bit for bit:
//   key     (k0, k1) = (low, high 32 bits of the uint64 seed)
//   counter (c0, c1, c2, c3) = (low, high 32 bits of the int64 offset, 0, 0)
//   10 rounds; the first output word c0 is the random uint32 of that offset;
//   uniform = float(x < 0 ? ~x : x) * 4.6566127342e-10f with x the word read as int32,
//   (int32 -> float rounds to nearest), a float in [0, 1).
// gumbel_softmax uses offset = philox offset + the element's logical (row-major) index.
//
// Templated on the lane type U so the CPU kernels can run the same code on SIMD vectors:
// U needs `U ^ U`, `U ^ uint32_t` and an overload of mulhilo32(U, uint32_t, U&, U&).
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace alchemy {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// The high and low 32 bits of a * b.
ALCHEMY_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = uint64_t(a) * b;
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

// First output word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1).
template <typename U>
ALCHEMY_HD U philox_word0(U c0, U c1, uint32_t k0, uint32_t k1) {
  U c2 = c0 ^ c0, c3 = c0 ^ c0;  // zero, in U
#pragma unroll
  for (int r = 0; r < kPhiloxRounds; ++r) {
    U hi_b, lo_b, hi_a, lo_a;
    mulhilo32(c2, kPhiloxRoundB, hi_b, lo_b);
    mulhilo32(c0, kPhiloxRoundA, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// The key of a uint64 seed, as Triton splits it.
struct PhiloxKey {
  uint32_t k0, k1;
};

ALCHEMY_HD PhiloxKey philox_key(uint64_t seed) { return {uint32_t(seed), uint32_t(seed >> 32)}; }

// Random uint32 at a 64-bit offset: Triton's randint(seed, offset) for an int64 offset.
ALCHEMY_HD uint32_t philox_bits(PhiloxKey key, uint64_t offset) {
  return philox_word0<uint32_t>(uint32_t(offset), uint32_t(offset >> 32), key.k0, key.k1);
}

// Triton's uint_to_uniform_float for uint32: the bits as int32, negatives complemented,
// times the largest scale with INT32_MAX * scale < 1 in float. [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;

ALCHEMY_HD float uniform_from_bits(uint32_t bits) {
  const int32_t x = static_cast<int32_t>(bits);
  return static_cast<float>(x < 0 ? ~x : x) * kUniformScale;
}

// Uniforms are clamped into [2^-32, 1 - 2^-24] before the transform: 0 (drawn with probability
// 2^-31) would give -log(-log(0)) = -inf. 1 - 2^-24 is the largest uniform the conversion makes;
// the upper clamp only guards against a future conversion that reaches 1.
constexpr float kUniformMin = 2.3283064365386963e-10f;  // 2^-32
constexpr float kUniformMax = 0.99999994039535522f;     // 1 - 2^-24

ALCHEMY_HD float clamp_uniform(float u) { return u < kUniformMin ? kUniformMin : (u > kUniformMax ? kUniformMax : u); }

// Standard Gumbel noise -log(-log(u)) in fp32, in [-3.1, 16.7]: always finite.
ALCHEMY_HD float gumbel_from_uniform(float u) {
#if defined(__CUDA_ARCH__)
  return -logf(-logf(clamp_uniform(u)));
#else
  return -std::log(-std::log(clamp_uniform(u)));
#endif
}

ALCHEMY_HD float gumbel_noise(PhiloxKey key, uint64_t offset) {
  return gumbel_from_uniform(uniform_from_bits(philox_bits(key, offset)));
}

}  // namespace alchemy
