#pragma once
// Online-softmax statistics shared by the CPU and CUDA kernels.
//
// A row's statistics are its running max `max` (of the raw logits x) and
// `sum = sum_j exp((x_j - max) * inv_t)`, where inv_t = 1 / temperature > 0.
// Partial statistics over disjoint parts of a row merge associatively, so a row
// can be reduced in one read (vector lanes, threads, warps, blocks).
#include <cmath>
#include <limits>

#include "macros.h"

namespace alchemy {

template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
};

ALCHEMY_HD float exp_acc(float x) { return expf(x); }
ALCHEMY_HD double exp_acc(double x) { return exp(x); }
ALCHEMY_HD float log_acc(float x) { return logf(x); }
ALCHEMY_HD double log_acc(double x) { return log(x); }

template <typename acc_t>
ALCHEMY_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
ALCHEMY_HD SoftmaxStats<acc_t> empty_stats() {
  return {neg_inf<acc_t>(), acc_t(0)};
}

// max that propagates NaN from either side, as torch.max does.
template <typename acc_t>
ALCHEMY_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// The value subtracted from logits before exp. A running max of -inf means
// "only -inf seen so far" (sum 0): subtracting it would give
// exp(-inf - -inf) = NaN mid-row, so shift by 0 instead.
template <typename acc_t>
ALCHEMY_HD acc_t finite_shift(acc_t max) {
  return max == neg_inf<acc_t>() ? acc_t(0) : max;
}

// Factor that moves a sum taken under `old_max` to one under `new_max`.
template <typename acc_t>
ALCHEMY_HD acc_t rescale_factor(acc_t old_max, acc_t new_max, acc_t inv_t) {
  return exp_acc((old_max - finite_shift(new_max)) * inv_t);
}

template <typename acc_t>
ALCHEMY_HD SoftmaxStats<acc_t> merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b,
                                     acc_t inv_t) {
  const acc_t m = nan_max(a.max, b.max);
  return {m, a.sum * rescale_factor(a.max, m, inv_t) + b.sum * rescale_factor(b.max, m, inv_t)};
}

// Adds the N values x[0..N) to running statistics: one exp per value plus one rescale.
template <typename acc_t, int N>
ALCHEMY_HD SoftmaxStats<acc_t> accumulate(SoftmaxStats<acc_t> s, const acc_t (&x)[N], acc_t inv_t) {
  acc_t m = s.max;
#pragma unroll
  for (int j = 0; j < N; ++j) m = nan_max(m, x[j]);
  const acc_t shift = finite_shift(m);
  // Rescale only when the max moved: a scalar loop would otherwise pay two exps per value.
  acc_t sum = m == s.max ? s.sum : s.sum * exp_acc((s.max - shift) * inv_t);
#pragma unroll
  for (int j = 0; j < N; ++j) sum += exp_acc((x[j] - shift) * inv_t);
  return {m, sum};
}

// A row whose max is NaN or +-inf has no finite softmax; PyTorch returns NaN for
// every entry of such a row (a fully -inf row included).
template <typename acc_t>
ALCHEMY_HD bool degenerate(acc_t max) {
  return !(max > neg_inf<acc_t>() && max < -neg_inf<acc_t>());
}

// Per-row constants of the output pass: y = (x - shift) * inv_t - log_sum for
// log-softmax, exp((x - shift) * inv_t) * inv_sum for softmax.
template <typename acc_t>
struct SoftmaxOutput {
  acc_t shift;
  acc_t log_sum;
  acc_t inv_sum;
};

template <typename acc_t>
ALCHEMY_HD SoftmaxOutput<acc_t> output_constants(SoftmaxStats<acc_t> s) {
  if (degenerate(s.max)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, nan, nan};
  }
  return {s.max, log_acc(s.sum), acc_t(1) / s.sum};
}

template <bool kLog, typename acc_t>
ALCHEMY_HD acc_t softmax_output(acc_t x, SoftmaxOutput<acc_t> c, acc_t inv_t) {
  const acc_t z = (x - c.shift) * inv_t;
  return kLog ? z - c.log_sum : exp_acc(z) * c.inv_sum;
}

// Gradient wrt the logits of y = (log_)softmax(x * inv_t), given dy and y, where
// row_dot = sum(dy) for log-softmax and sum(dy * y) for softmax.
template <bool kLog, typename acc_t>
ALCHEMY_HD acc_t softmax_grad(acc_t dy, acc_t y, acc_t row_dot, acc_t inv_t) {
  return kLog ? (dy - exp_acc(y) * row_dot) * inv_t : y * (dy - row_dot) * inv_t;
}

template <bool kLog, typename acc_t>
ALCHEMY_HD acc_t grad_dot_term(acc_t dy, acc_t y) {
  return kLog ? dy : dy * y;
}

}  // namespace alchemy
