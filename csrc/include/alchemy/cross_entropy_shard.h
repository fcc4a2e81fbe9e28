#pragma once
// Vocab-parallel cross-entropy: what one shard of the classes contributes, shared by the
// CPU and CUDA kernels. alchemy_ops/distributed.py all-gathers these statistics (one
// collective) and combines them into the loss of the whole vocabulary; the gradient of a
// shard then needs no further communication.
//
// The shard holds classes [class_start, class_start + C) of V, with z = softcap(x) and w
// its class weights (1 without weight). Per position it reports:
//   max     the max of z over the shard
//   log_sum log sum_c exp(z_c - max): -inf for a shard of -inf logits (its lse is -inf, a
//           neutral element of the merge), NaN for NaN or +inf logits
//   z_y,w_y z and w at the target class, 0 when the target is in another shard
//   s       sum_c w_c (z_c - m), only with label smoothing (else 0), m = finite_shift(max):
//           0 for a shard of -inf logits, whose sum is then -inf (NaN with a zero weight),
//           as PyTorch's smoothing term is
//   W       sum_c w_c, the shard's share of the smoothing mass
// so that lse = logsumexp over shards of (max + log_sum), and the smoothing sum
// sum_c w_c (lse - z_c) = sum over shards of W (lse - m) - s.
//
// Gradient wrt z_c, with g the upstream gradient and the coefficients formed from the
// whole vocabulary's lse, w_y and W (see cross_entropy.h):
//   g (a p_c - eps / V w_c - [c == y] (1 - eps) w_y) = prob p_c - weight w_c - [c == y] target
#include <cstdint>

#include "cross_entropy.h"

namespace alchemy {

enum ShardStat : int {
  kShardMax = 0,
  kShardLogSum,
  kShardTargetLogit,
  kShardTargetWeight,
  kShardSmoothingSum,
  kShardWeightSum,
  kShardStats,  // columns per position
};

// The target's column in this shard, or -1 when it lies in another shard.
ALCHEMY_HD int64_t shard_column(int64_t target, int64_t class_start, int64_t classes) {
  const int64_t column = target - class_start;
  return column >= 0 && column < classes ? column : -1;
}

// log sum_c exp(z_c - max) of a shard; unlike a whole row, a shard of -inf logits is no
// degenerate case: it adds nothing to the merged sum.
template <typename acc_t>
ALCHEMY_HD acc_t shard_log_sum(SoftmaxStats<acc_t> s) {
  if (s.max == neg_inf<acc_t>()) return neg_inf<acc_t>();
  return log_acc(s.sum);
}

// Per-position coefficients of the shard gradient (coeffs columns 0, 1, 2).
template <typename acc_t>
struct ShardGradCoeffs {
  acc_t prob;    // g * a
  acc_t weight;  // g * eps / V
  acc_t target;  // g * (1 - eps) * w_y
};

// The gradient wrt x at the target column, formed in acc_t before any rounding.
template <typename acc_t>
ALCHEMY_HD acc_t shard_grad_at_target(acc_t x_target, acc_t w_target, SplitLse<acc_t> lse, ShardGradCoeffs<acc_t> k,
                                      acc_t softcap) {
  const acc_t z = capped_logit(x_target, softcap);
  return (k.prob * prob_from_lse(z, lse) - k.weight * w_target - k.target) * capped_logit_grad(x_target, softcap);
}

}  // namespace alchemy
