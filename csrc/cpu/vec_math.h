#pragma once
#include <algorithm>
// Vectorized load/store/exp helpers for the CPU kernels. Every computation runs
// in acc_t (float for fp32/bf16/fp16, double for fp64); at::vec is only
// vectorized when the file is compiled with a CPU_CAPABILITY_* define, which
// setup.py sets from the build machine's capability.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

// Register-resident arrays of vectors need their small fixed loops unrolled.
#if defined(__clang__)
#define ALCHEMY_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ALCHEMY_UNROLL _Pragma("GCC unroll 16")
#else
#define ALCHEMY_UNROLL
#endif

namespace alchemy::cpu {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_type<scalar_t>>;

template <typename scalar_t>
constexpr bool is_reduced_float =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// Loads AccVec::size() consecutive elements of p, widened to acc_t.
template <typename scalar_t>
inline AccVec<scalar_t> load_acc(const scalar_t* p) {
  if constexpr (is_reduced_float<scalar_t>) {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  } else {
    return AccVec<scalar_t>::loadu(p);
  }
}

// Stores the AccVec::size() lanes of v to p, rounded to scalar_t.
template <typename scalar_t, typename acc_vec_t>
inline void store_acc(scalar_t* p, const acc_vec_t& v) {
  if constexpr (is_reduced_float<scalar_t>) {
#if defined(CPU_CAPABILITY_AVX512)
    // One 256-bit store; the generic path below goes through a stack buffer.
    const __m256i packed = std::is_same_v<scalar_t, c10::BFloat16> ? at::vec::cvtfp32_bf16(__m512(v))
                                                                   : at::vec::cvtfp32_fp16(__m512(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = std::is_same_v<scalar_t, c10::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                                   : at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, acc_vec_t::size());
#endif
  } else {
    v.store(p);
  }
}

// load_acc of the n < AccVec::size() elements at p (a row's tail), zeros in the other lanes: a
// masked load on AVX-512, where a scalar tail of a short row would cost an exp per element.
template <typename scalar_t>
inline AccVec<scalar_t> load_acc(const scalar_t* p, int64_t n) {
  if constexpr (is_reduced_float<scalar_t>) {
    scalar_t padded[AccVec<scalar_t>::size()] = {};
    std::copy_n(p, n, padded);
    return load_acc(padded);
  } else {
    return AccVec<scalar_t>::loadu(p, n);
  }
}

// store_acc of the first n < AccVec::size() lanes of v.
template <typename scalar_t, typename acc_vec_t>
inline void store_acc(scalar_t* p, const acc_vec_t& v, int64_t n) {
  if constexpr (is_reduced_float<scalar_t>) {
    scalar_t padded[acc_vec_t::size()];
    store_acc(padded, v);
    std::copy_n(padded, n, p);
  } else {
    v.store(p, n);
  }
}

// As store_acc, but bypassing the cache where the CPU can: for outputs far larger than the
// cache, a plain store first reads each line it writes (a third pass over memory). The
// writer must call stream_fence() before another thread reads what it streamed.
template <typename scalar_t, typename acc_vec_t>
inline void store_acc_stream(scalar_t* p, const acc_vec_t& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_pd(p, v);
  }
  // bf16/fp16: no streaming. A vector is half a cache line, and 256-bit streaming stores ran the
  // bf16 cross-entropy backward at half the speed of plain stores here (72.7 ms against 36.7 ms
  // for [4096, 32000]); for fp32, full-line streaming stores save ~10%.
#endif
  store_acc(p, v);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// exp of arguments <= 0, the only ones softmax needs (x - max, log-probabilities):
// exp(-inf) = 0 and NaN stays NaN, which is how a NaN logit reaches its row's sum.
template <typename acc_vec_t>
inline acc_vec_t fast_exp(const acc_vec_t& v) {
  // ATen's polynomial exp (<= 20 ulp; Sleef's exact exp for double) clamps NaN away: put it back.
  return acc_vec_t::blendv(v.exp_u20(), v, v.isnan());
}

// exp(x) - 1 for x <= 0 (p - 1 for x = log p), accurate relative to the result where exp(x) - 1
// cancels: a Taylor polynomial for |x| <= 1/4 (degree 7, truncation below 2e-9 relative), fast_exp(x)
// - 1 beyond, where |p - 1| > 0.2 keeps fast_exp's error small against it. fp64: Sleef's expm1.
template <typename acc_vec_t>
inline acc_vec_t fast_expm1(const acc_vec_t& x) {
  using acc_t = typename acc_vec_t::value_type;
  if constexpr (std::is_same_v<acc_t, double>) {
    return x.expm1();
  } else {
    acc_vec_t p(acc_t(1.0 / 5040));
    for (const double k : {1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 1.0 / 2, 1.0}) p = at::vec::fmadd(p, x, acc_vec_t(acc_t(k)));
    return acc_vec_t::blendv(fast_exp(x) - acc_vec_t(1), p * x, x.abs() <= acc_vec_t(acc_t(0.25)));
  }
}

// Running max of logits. It may drop a NaN: fast_exp carries NaN into the row sum instead,
// and a NaN sum makes every output of the row NaN, as a NaN max would.
template <typename acc_vec_t>
inline acc_vec_t running_max(const acc_vec_t& a, const acc_vec_t& b) {
  return at::vec::maximum(a, b);
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 Taylor
// polynomial for e^r (error ~1e-7 relative) and vscalefps for the 2^n: 11
// instructions against ~20, results below FLT_MIN flushed to 0 by a zero mask
// that lets NaN through.
template <>
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& v) {
  const __m512 x = v;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2 split in two for an exact n*ln2
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

template <>
inline at::vec::Vectorized<float> running_max(const at::vec::Vectorized<float>& a,
                                              const at::vec::Vectorized<float>& b) {
  return _mm512_max_ps(a, b);  // one instruction; ATen's maximum adds a NaN fix-up
}
#endif

// Transposed blocks of short rows, one row per vector lane: buf[c * kVec + l] = class c of
// row l, which starts at x + off[l] with its classes at stride `cls`; zeros in lanes [rows, kVec).
template <int64_t kVec, typename scalar_t, typename buf_t, typename Offsets>
inline void load_transposed(const scalar_t* x, int64_t cls, const Offsets& off, int64_t rows, int64_t C, buf_t* buf) {
  for (int64_t l = 0; l < kVec; ++l) {
    if (l < rows) {
      for (int64_t c = 0; c < C; ++c) buf[c * kVec + l] = static_cast<buf_t>(x[off[l] + c * cls]);
    } else {
      for (int64_t c = 0; c < C; ++c) buf[c * kVec + l] = buf_t(0);
    }
  }
}

// The inverse of load_transposed for the first `rows` lanes.
template <int64_t kVec, typename buf_t, typename scalar_t, typename Offsets>
inline void store_transposed(const buf_t* buf, int64_t rows, int64_t C, scalar_t* y, int64_t cls, const Offsets& off) {
  for (int64_t l = 0; l < rows; ++l)
    for (int64_t c = 0; c < C; ++c) y[off[l] + c * cls] = static_cast<scalar_t>(buf[c * kVec + l]);
}

// split_lse of cross_entropy.h on a vector: the fp64 lse of Vec::size() positions as hi + lo in
// acc_t (hi the rounded lse, lo what it lost).
template <typename acc_t>
inline void load_split_lse(const double* lse, at::vec::Vectorized<acc_t>& hi, at::vec::Vectorized<acc_t>& lo) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, double>) {
    hi = Vec::loadu(lse);
    lo = Vec(0);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512d a = _mm512_loadu_pd(lse), b = _mm512_loadu_pd(lse + 8);
    const __m256 ha = _mm512_cvtpd_ps(a), hb = _mm512_cvtpd_ps(b);
    hi = _mm512_insertf32x8(_mm512_castps256_ps512(ha), hb, 1);
    lo = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_sub_pd(a, _mm512_cvtps_pd(ha)))),
                            _mm512_cvtpd_ps(_mm512_sub_pd(b, _mm512_cvtps_pd(hb))), 1);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256d a = _mm256_loadu_pd(lse), b = _mm256_loadu_pd(lse + 4);
    const __m128 ha = _mm256_cvtpd_ps(a), hb = _mm256_cvtpd_ps(b);
    hi = _mm256_set_m128(hb, ha);
    lo = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(b, _mm256_cvtps_pd(hb))),
                         _mm256_cvtpd_ps(_mm256_sub_pd(a, _mm256_cvtps_pd(ha))));
#else
    acc_t h[Vec::size()], l[Vec::size()];
    for (int k = 0; k < Vec::size(); ++k) {
      h[k] = static_cast<acc_t>(lse[k]);
      l[k] = static_cast<acc_t>(lse[k] - static_cast<double>(h[k]));
    }
    hi = Vec::loadu(h);
    lo = Vec::loadu(l);
#endif
  }
}

template <typename acc_t>
inline acc_t reduce_max(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

}  // namespace alchemy::cpu
