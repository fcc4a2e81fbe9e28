#pragma once
// Cross-entropy math shared by the CPU and CUDA kernels: the per-position loss from
// one pass of row statistics, and the gradient coefficients of the backward pass.
//
// With z = softcap(x) (identity when softcap <= 0), lse = log sum_c exp(z_c),
// eps = label_smoothing, C classes, w the class weights (1 without weight) and
// W = sum_c w_c, PyTorch's loss at one position is
//   class index y:  (1 - eps) w_y (lse - z_y) + eps / C * sum_c w_c (lse - z_c)
//   probabilities t: sum_c w_c t'_c (lse - z_c),  t'_c = (1 - eps) t_c + eps / C
// plus our z-loss extra z_loss * lse^2. The gradient wrt z_c is
//   class index:    g * (a * p_c - eps / C * w_c - [c == y] (1 - eps) w_y)
//   probabilities:  g * (a * p_c - w_c t'_c)
// with p_c = exp(z_c - lse), a = (1 - eps) w_y + eps / C * W + 2 z_loss lse for class
// indices and a = sum_c w_c t'_c + 2 z_loss lse for probabilities, times
// dz/dx = 1 - tanh(x / softcap)^2 under softcap.
//
// Precision: the forward loss is formed from (z - max) and log_sum, never as lse - z,
// and the lse saved for backward is fp64 (max + log_sum exactly), split into two
// fp32 halves there: exp((z - hi) - lo) keeps fp32 accuracy for logits of any size,
// where an fp32 lse near 1e4 would be off by ~5e-4.
#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"
#include "online_softmax.h"

namespace alchemy {

template <typename acc_t>
struct CrossEntropyConfig {
  int64_t classes;
  int64_t ignore_index;
  acc_t smoothing;   // eps in [0, 1]
  acc_t z_loss;      // >= 0
  acc_t softcap;     // <= 0: none
  acc_t weight_sum;  // W: sum of the class weights (C without weight)
};

template <typename acc_t>
ALCHEMY_HD acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

ALCHEMY_HD float tanh_acc(float x) { return tanhf(x); }
ALCHEMY_HD double tanh_acc(double x) { return tanh(x); }

// The logit the softmax sees: softcap * tanh(x / softcap), or x.
template <typename acc_t>
ALCHEMY_HD acc_t capped_logit(acc_t x, acc_t softcap) {
  return softcap > acc_t(0) ? softcap * tanh_acc(x / softcap) : x;
}

// d capped_logit / dx.
template <typename acc_t>
ALCHEMY_HD acc_t capped_logit_grad(acc_t x, acc_t softcap) {
  if (!(softcap > acc_t(0))) return acc_t(1);
  const acc_t t = tanh_acc(x / softcap);
  return acc_t(1) - t * t;
}

// A row's log-sum-exp kept as its two parts: the max of z and log sum_c exp(z_c - max).
template <typename acc_t>
struct RowLogSumExp {
  acc_t max;
  acc_t log_sum;
  ALCHEMY_HD acc_t value() const { return max + log_sum; }
};

// From the row statistics (inv_t = 1); NaN parts when the row max is NaN or +-inf (a
// fully -inf row included), where PyTorch's log_softmax is NaN too.
template <typename acc_t>
ALCHEMY_HD RowLogSumExp<acc_t> row_log_sum_exp(SoftmaxStats<acc_t> s) {
  if (degenerate(s.max)) return {quiet_nan<acc_t>(), quiet_nan<acc_t>()};
  return {s.max, log_acc(s.sum)};
}

// The lse saved for backward: fp64, so that max + log_sum is not rounded.
template <typename acc_t>
ALCHEMY_HD double saved_lse(RowLogSumExp<acc_t> l) {
  return static_cast<double>(l.max) + static_cast<double>(l.log_sum);
}

// A saved lse as hi + lo in acc_t: z - hi is exact for z near hi, then lo corrects.
template <typename acc_t>
struct SplitLse {
  acc_t hi;
  acc_t lo;
  ALCHEMY_HD acc_t value() const { return hi + lo; }
};

template <typename acc_t>
ALCHEMY_HD SplitLse<acc_t> split_lse(double lse) {
  const acc_t hi = static_cast<acc_t>(lse);
  return {hi, static_cast<acc_t>(lse - static_cast<double>(hi))};
}

// p = exp(z - lse).
template <typename acc_t>
ALCHEMY_HD acc_t prob_from_lse(acc_t z, SplitLse<acc_t> l) {
  return exp_acc((z - l.hi) - l.lo);
}

// A class index the kernels may read; anything else (and not ignore_index) is bad input.
ALCHEMY_HD bool target_in_range(int64_t target, int64_t classes) { return target >= 0 && target < classes; }

// Loss at a class-index position. shifted_weighted_sum = sum_c w_c (z_c - max), only read
// when eps > 0 (so a -inf logit costs nothing without smoothing, as in PyTorch).
template <typename acc_t>
ALCHEMY_HD acc_t class_target_loss(RowLogSumExp<acc_t> l, acc_t z_target, acc_t w_target,
                                   acc_t shifted_weighted_sum, const CrossEntropyConfig<acc_t>& cfg) {
  acc_t loss = (acc_t(1) - cfg.smoothing) * w_target * (l.log_sum - (z_target - l.max));
  if (cfg.smoothing > acc_t(0))
    loss += cfg.smoothing / acc_t(cfg.classes) * (cfg.weight_sum * l.log_sum - shifted_weighted_sum);
  const acc_t lse = l.value();
  return loss + cfg.z_loss * lse * lse;
}

// Loss at a probability-target position, from T = sum_c w_c t'_c and
// shifted_dot = sum_c w_c t'_c (z_c - max).
template <typename acc_t>
ALCHEMY_HD acc_t prob_target_loss(RowLogSumExp<acc_t> l, acc_t target_mass, acc_t shifted_dot,
                                  const CrossEntropyConfig<acc_t>& cfg) {
  const acc_t lse = l.value();
  return target_mass * l.log_sum - shifted_dot + cfg.z_loss * lse * lse;
}

// t'_c: the smoothed probability target.
template <typename acc_t>
ALCHEMY_HD acc_t smoothed_prob(acc_t t, const CrossEntropyConfig<acc_t>& cfg) {
  return (acc_t(1) - cfg.smoothing) * t + cfg.smoothing / acc_t(cfg.classes);
}

// The coefficient a of p_c in the gradient; target_mass is (1 - eps) w_y + eps / C * W
// for class indices (class_target_mass) and sum_c w_c t'_c for probabilities.
template <typename acc_t>
ALCHEMY_HD acc_t grad_prob_coeff(acc_t target_mass, SplitLse<acc_t> l, const CrossEntropyConfig<acc_t>& cfg) {
  return target_mass + acc_t(2) * cfg.z_loss * l.value();
}

template <typename acc_t>
ALCHEMY_HD acc_t class_target_mass(acc_t w_target, const CrossEntropyConfig<acc_t>& cfg) {
  return (acc_t(1) - cfg.smoothing) * w_target + cfg.smoothing / acc_t(cfg.classes) * cfg.weight_sum;
}

// eps / C * w_c: the smoothing part of the class-index gradient's constant term.
template <typename acc_t>
ALCHEMY_HD acc_t smoothing_grad_term(acc_t w_c, const CrossEntropyConfig<acc_t>& cfg) {
  return cfg.smoothing / acc_t(cfg.classes) * w_c;
}

// Gradient wrt x at the target class of a class-index position, formed in acc_t before
// any rounding (p_y - 1 must not be rounded from p_y first).
template <typename acc_t>
ALCHEMY_HD acc_t class_target_grad_at_target(acc_t g, acc_t x_target, SplitLse<acc_t> l, acc_t w_target,
                                             const CrossEntropyConfig<acc_t>& cfg) {
  const acc_t z = capped_logit(x_target, cfg.softcap);
  const acc_t a = grad_prob_coeff(class_target_mass(w_target, cfg), l, cfg);
  const acc_t d = a * prob_from_lse(z, l) - smoothing_grad_term(w_target, cfg) - (acc_t(1) - cfg.smoothing) * w_target;
  return g * d * capped_logit_grad(x_target, cfg.softcap);
}

}  // namespace alchemy
