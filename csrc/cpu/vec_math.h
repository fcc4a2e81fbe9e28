#pragma once
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
    at::vec::convert_from_float<scalar_t>(v, v).store(p, acc_vec_t::size());
  } else {
    v.store(p);
  }
}

// exp with at most 20 ulp error (ATen's own softmax uses it). Its range
// clamping would turn NaN into a finite number, so NaN lanes are put back.
template <typename acc_vec_t>
inline acc_vec_t fast_exp(const acc_vec_t& v) {
  return acc_vec_t::blendv(v.exp_u20(), v, v.isnan());
}

template <typename acc_vec_t>
inline acc_vec_t nan_maximum(const acc_vec_t& a, const acc_vec_t& b) {
  return at::vec::maximum(a, b);  // propagates NaN
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
