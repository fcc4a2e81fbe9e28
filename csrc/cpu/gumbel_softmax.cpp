// CPU kernel of gumbel_softmax_forward: softmax((x + g - max) / tau) along one dim with the
// Gumbel noise g drawn in the kernel from Philox4x32-10 (alchemy/philox.h), never stored.
//
// Per row: one pass draws the noise (16 Philox streams per AVX-512 vector, 8 per AVX2 one), forms z = x + g in
// a row-sized per-thread buffer and takes its max; the soft sample exponentiates the buffer in
// place and scales it into the output; the hard sample is a one-hot at the first index of the
// max. The backward is softmax_backward on the soft sample (see alchemy_ops/gumbel_softmax.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include <alchemy/gumbel_softmax_host.h>
#include <alchemy/online_softmax.h>
#include <alchemy/philox.h>

#include "huge_pages.h"
#include "vec_math.h"

namespace alchemy::cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// log x from its split x = m 2^e, m in [0.75, 1.5): log m = 2 atanh(s), s = (m - 1) / (m + 1) in
// [-1/7, 1/5], by its odd series to s^9 (truncation < 1e-8 relative). m - 1 is exact, so log x keeps
// full relative precision near x = 1, where -log(u) of a uniform close to 1 is tiny.
inline at::vec::Vectorized<float> log_of_split(at::vec::Vectorized<float> m, at::vec::Vectorized<float> e) {
  using Vec = at::vec::Vectorized<float>;
  const Vec one(1.0f);
  const Vec s = (m - one) / (m + one);
  const Vec s2 = s * s;
  Vec p(2.0f / 9);
  p = at::vec::fmadd(p, s2, Vec(2.0f / 7));
  p = at::vec::fmadd(p, s2, Vec(2.0f / 5));
  p = at::vec::fmadd(p, s2, Vec(2.0f / 3));
  p = at::vec::fmadd(p, s2, Vec(2.0f));
  // e ln2 with ln2 split in two (e is an integer of at most 8 bits: the high part is exact).
  return at::vec::fmadd(e, Vec(0.693145752f), at::vec::fmadd(e, Vec(1.42860677e-06f), s * p));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// 16 Philox lanes: the lane type of philox_word0 (found by argument-dependent lookup).
struct U32x16 {
  __m512i v;
};
inline U32x16 operator^(U32x16 a, U32x16 b) { return {_mm512_xor_si512(a.v, b.v)}; }
inline U32x16 operator^(U32x16 a, uint32_t b) { return {_mm512_xor_si512(a.v, _mm512_set1_epi32(int(b)))}; }
inline void mulhilo32(U32x16 a, uint32_t b, U32x16& hi, U32x16& lo) {
  const __m512i vb = _mm512_set1_epi32(int(b));
  const __m512i even = _mm512_mul_epu32(a.v, vb);                        // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), vb);  // ... and of lanes 1, 3, ...
  hi.v = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo.v = _mm512_mullo_epi32(a.v, vb);  // one instruction: faster here than a shift and a blend of the products
}

// The uniforms at counters offset + 0..15, as uniform_from_bits(philox_bits()) lane by lane.
inline __m512 uniform16(PhiloxKey key, uint64_t offset) {
  const __m512i base = _mm512_set1_epi32(int(uint32_t(offset)));
  const __m512i lo = _mm512_add_epi32(base, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base);
  const __m512i hi = _mm512_mask_add_epi32(_mm512_set1_epi32(int(uint32_t(offset >> 32))), carry,
                                           _mm512_set1_epi32(int(uint32_t(offset >> 32))), _mm512_set1_epi32(1));
  const __m512i bits = philox_word0<U32x16>({lo}, {hi}, key.k0, key.k1).v;
  // uniform_from_bits: x < 0 ? ~x : x is x ^ (x >> 31) (arithmetic shift).
  const __m512i x = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));  // int32 -> float rounds to nearest
}

// log x for normal x > 0 (all the noise needs), ~2 ulp; about half the instructions of Sleef's logf.
inline __m512 log_normal_ps(__m512 x) {
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  __m512 e = _mm512_getexp_ps(x);  // floor(log2 x); one more when m was halved into [0.75, 1)
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e, _mm512_set1_ps(1.0f));
  return log_of_split(m, e);
}

// Gumbel noise at counters offset + 0..15, as gumbel_noise() lane by lane up to the last
// bits of the logs (log_normal_ps here, std::log there).
inline at::vec::Vectorized<float> gumbel_lanes(PhiloxKey key, uint64_t offset) {
  __m512 u = uniform16(key, offset);
  u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(kUniformMin)), _mm512_set1_ps(kUniformMax));
  const __m512 neg_log_u = _mm512_sub_ps(_mm512_setzero_ps(), log_normal_ps(u));  // in [6e-8, 22.2]: normal
  return _mm512_sub_ps(_mm512_setzero_ps(), log_normal_ps(neg_log_u));
}
inline void store_uniforms(float* out, PhiloxKey key, uint64_t offset) { _mm512_storeu_ps(out, uniform16(key, offset)); }
constexpr int64_t kNoiseLanes = 16;
#elif defined(CPU_CAPABILITY_AVX2)
// The same noise, 8 Philox lanes per AVX2 vector (without it the noise is scalar: 11x slower).
struct U32x8 {
  __m256i v;
};
inline U32x8 operator^(U32x8 a, U32x8 b) { return {_mm256_xor_si256(a.v, b.v)}; }
inline U32x8 operator^(U32x8 a, uint32_t b) { return {_mm256_xor_si256(a.v, _mm256_set1_epi32(int(b)))}; }
inline void mulhilo32(U32x8 a, uint32_t b, U32x8& hi, U32x8& lo) {
  const __m256i vb = _mm256_set1_epi32(int(b));
  const __m256i even = _mm256_mul_epu32(a.v, vb);                        // 64-bit products of lanes 0, 2, ...
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), vb);  // ... and of lanes 1, 3, ...
  hi.v = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo.v = _mm256_mullo_epi32(a.v, vb);
}

// The uniforms at counters offset + 0..7, as uniform_from_bits(philox_bits()) lane by lane.
inline __m256 uniform8(PhiloxKey key, uint64_t offset) {
  const __m256i base = _mm256_set1_epi32(int(uint32_t(offset)));
  const __m256i lo = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // lo < base unsigned (the low word wrapped): a signed compare of both with the sign bit flipped.
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(lo, sign));  // -1 or 0
  const __m256i hi = _mm256_sub_epi32(_mm256_set1_epi32(int(uint32_t(offset >> 32))), carry);
  const __m256i bits = philox_word0<U32x8>({lo}, {hi}, key.k0, key.k1).v;
  const __m256i x = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));  // x < 0 ? ~x : x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

// log_normal_ps of the AVX-512 path, with the exponent and mantissa taken from the bits: x = m 2^e,
// m in [0.75, 1.5) (the same split, so the same result bit for bit).
inline __m256 log_normal_ps(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f800000)));  // [1, 2)
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  const __m256 halve = _mm256_cmp_ps(m, _mm256_set1_ps(1.5f), _CMP_GE_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), halve);
  e = _mm256_add_ps(e, _mm256_and_ps(halve, _mm256_set1_ps(1.0f)));
  return log_of_split(m, e);
}

inline at::vec::Vectorized<float> gumbel_lanes(PhiloxKey key, uint64_t offset) {
  __m256 u = uniform8(key, offset);
  u = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(kUniformMin)), _mm256_set1_ps(kUniformMax));
  const __m256 neg_log_u = _mm256_sub_ps(_mm256_setzero_ps(), log_normal_ps(u));
  return _mm256_sub_ps(_mm256_setzero_ps(), log_normal_ps(neg_log_u));
}
inline void store_uniforms(float* out, PhiloxKey key, uint64_t offset) { _mm256_storeu_ps(out, uniform8(key, offset)); }
constexpr int64_t kNoiseLanes = 8;
#else
constexpr int64_t kNoiseLanes = 0;  // scalar noise (the compiler may still vectorize the rest)
#endif

template <typename acc_t>
acc_t* row_buffer(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// z[c] = x[c * stride] + g(offset + c * stride) for c < C; returns the max of z (NaN if any is NaN).
template <typename in_t, typename acc_t>
acc_t perturb_row(const in_t* x, acc_t* z, int64_t C, int64_t stride, PhiloxKey key, uint64_t offset) {
  int64_t c = 0;
  acc_t m = neg_inf<acc_t>();
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (stride == 1) {
      using Vec = at::vec::Vectorized<float>;
      Vec vmax(neg_inf<float>());
      for (; c + kNoiseLanes <= C; c += kNoiseLanes) {
        const Vec v = load_acc(x + c) + gumbel_lanes(key, offset + c);
        v.store(z + c);
        vmax = at::vec::maximum(vmax, v);  // propagates NaN
      }
      m = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
    }
  }
#endif
  for (; c < C; ++c) {
    z[c] = static_cast<acc_t>(x[c * stride]) + static_cast<acc_t>(gumbel_noise(key, offset + uint64_t(c * stride)));
    m = nan_max(m, z[c]);
  }
  return m;
}

// First index of the max m in z[0..C): ties go to the lowest index.
template <typename acc_t>
int64_t first_index_of(const acc_t* z, int64_t C, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec vm(m);
  int64_t c = 0;
  for (; c + kVec <= C; c += kVec) {
    const int not_equal = (Vec::loadu(z + c) == vm).zero_mask();  // bit j set: lane j differs
    if (not_equal != (1 << kVec) - 1) return c + __builtin_ctz(~not_equal);
  }
  for (; c < C; ++c)
    if (z[c] == m) return c;
  return 0;  // unreachable: m is one of the z
}

// z[c] <- exp((z[c] - m) * inv_t); returns the sum. m is finite here, so every term is in [0, 1].
template <typename acc_t>
acc_t exp_row(acc_t* z, int64_t C, acc_t m, acc_t inv_t) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec vm(m), vinv(inv_t);
  Vec vsum[2] = {Vec(0), Vec(0)};
  int64_t c = 0;
  for (; c + 2 * kVec <= C; c += 2 * kVec) {
    ALCHEMY_UNROLL
    for (int j = 0; j < 2; ++j) {
      const Vec e = fast_exp((Vec::loadu(z + c + j * kVec) - vm) * vinv);
      e.store(z + c + j * kVec);
      vsum[j] = vsum[j] + e;
    }
  }
  for (; c + kVec <= C; c += kVec) {
    const Vec e = fast_exp((Vec::loadu(z + c) - vm) * vinv);
    e.store(z + c);
    vsum[0] = vsum[0] + e;
  }
  acc_t sum = reduce_sum(vsum[0] + vsum[1]);
  for (; c < C; ++c) sum += (z[c] = exp_acc((z[c] - m) * inv_t));
  return sum;
}

// out[c * stride] = z[c] * scale, rounded to out_t.
template <typename out_t, typename acc_t>
void store_row(out_t* out, const acc_t* z, int64_t C, int64_t stride, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  int64_t c = 0;
  if (stride == 1) {
    const Vec vs(scale);
    for (; c + kVec <= C; c += kVec) store_acc(out + c, Vec::loadu(z + c) * vs);
  }
  for (; c < C; ++c) out[c * stride] = static_cast<out_t>(z[c] * scale);
}

template <typename out_t>
void fill_row(out_t* out, int64_t C, int64_t stride, out_t value) {
  for (int64_t c = 0; c < C; ++c) out[c * stride] = value;
}

// One row of C classes at `stride`; its noise counters are offset + c * stride.
template <typename scalar_t>
void gumbel_row(const scalar_t* x, scalar_t* y, scalar_t* y_soft, int64_t C, int64_t stride, PhiloxKey key,
                uint64_t offset, acc_type<scalar_t> inv_t, bool hard) {
  using acc_t = acc_type<scalar_t>;
  acc_t* z = row_buffer<acc_t>(C);
  const acc_t m = perturb_row(x, z, C, stride, key, offset);
  if (degenerate(m)) {  // a NaN or +inf logit, or every logit -inf: NaN, as PyTorch's formula gives
    const auto nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    fill_row(y, C, stride, nan);
    if (y_soft != nullptr) fill_row(y_soft, C, stride, nan);
    return;
  }
  if (hard) {
    const int64_t arg = first_index_of(z, C, m);
    if (stride == 1) {
      std::memset(static_cast<void*>(y), 0, C * sizeof(scalar_t));  // +0.0 in every floating dtype
    } else {
      fill_row(y, C, stride, scalar_t(0));
    }
    y[arg * stride] = scalar_t(1);
    if (y_soft == nullptr) return;  // no gradient wanted: the soft sample is never formed
  }
  const acc_t sum = exp_row(z, C, m, inv_t);  // >= 1: the max contributes exp(0)
  store_row(hard ? y_soft : y, z, C, stride, acc_t(1) / sum);
}

void gumbel_launch(const GumbelProblem& p, at::Tensor& y, const at::Tensor& y_soft, double inv_t, bool hard) {
  advise_huge_pages(y);
  if (y_soft.defined()) advise_huge_pages(y_soft);
  const auto seed = static_cast<uint64_t>(p.seed.item<int64_t>());
  const PhiloxKey key = philox_key(seed);
  const auto offset = static_cast<uint64_t>(p.offset);
  const int64_t C = p.classes, inner = p.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_gumbel_softmax", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = p.x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = y_soft.defined() ? y_soft.mutable_data_ptr<scalar_t>() : nullptr;
    const auto it = static_cast<acc_t>(inv_t);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, p.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // Row (o, i) starts at o * C * inner + i; its classes are `inner` apart.
        const int64_t start = (r / inner) * C * inner + r % inner;
        gumbel_row(xp + start, yp + start, sp ? sp + start : nullptr, C, inner, key, offset + uint64_t(start), it,
                   hard);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_forward(const at::Tensor& logits, const at::Tensor& seed,
                                                          int64_t offset, double tau, bool hard, bool keep_soft,
                                                          int64_t dim) {
  return gumbel_softmax_forward_host(logits, seed, offset, tau, hard, keep_soft, dim, gumbel_launch);
}

at::Tensor philox_uniform(const at::Tensor& seed, int64_t offset, int64_t numel) {
  const PhiloxKey key = philox_uniform_key(seed, offset, numel);
  at::Tensor u = at::empty({numel}, seed.options().dtype(at::kFloat));
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t k = begin;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    for (; k + kNoiseLanes <= end; k += kNoiseLanes) store_uniforms(up + k, key, uint64_t(offset + k));
#endif
    for (; k < end; ++k) up[k] = uniform_from_bits(philox_bits(key, uint64_t(offset + k)));
  });
  return u;
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("gumbel_softmax_forward", &gumbel_softmax_forward);
  m.impl("philox_uniform", &philox_uniform);
}

}  // namespace alchemy::cpu
