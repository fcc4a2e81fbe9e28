#pragma once
// Top-k softmax math shared by the CPU and CUDA kernels.
//
// Order of a row: by value, descending, NaN above +inf (as torch.topk sorts it), -0 equal to +0,
// equal values by lowest index. The k first elements of that order are selected; the k weights
// are exp((x - max) * inv_t - lse) with max the row max (the top-1 value) and lse the log-sum of
// exp((x - max) * inv_t) over the normalization set: the k selected (renormalize) or the whole row.
// A row whose max is NaN or +-inf has no finite softmax: lse is NaN and so is every weight.
#include <cstdint>
#include <cstring>
#include <limits>

#include "macros.h"
#include "online_softmax.h"

namespace alchemy {

// Whether (va, ia) comes before (vb, ib) in the order above.
template <typename acc_t>
ALCHEMY_HD bool topk_before(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// An unsigned integer key of a value, monotone in the order above (ties: equal keys): NaN is the
// largest key, -0 and +0 share one.
template <typename acc_t>
struct TopkKey;

template <>
struct TopkKey<float> {
  using type = uint32_t;
};

template <>
struct TopkKey<double> {
  using type = uint64_t;
};

template <typename acc_t>
ALCHEMY_HD typename TopkKey<acc_t>::type topk_key(acc_t v) {
  using key_t = typename TopkKey<acc_t>::type;
  constexpr int kBits = sizeof(key_t) * 8;
  constexpr key_t kSign = key_t(1) << (kBits - 1);
  if (v != v) return ~key_t(0);
  v = v + acc_t(0);  // -0 + 0 = +0
  key_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return (bits & kSign) ? ~bits : (bits | kSign);
}

// Per-row constants of the weights: w = exp((x - max) * inv_t - lse).
template <typename acc_t>
ALCHEMY_HD acc_t topk_weight(acc_t x, acc_t max, acc_t lse, acc_t inv_t) {
  return exp_acc((x - max) * inv_t - lse);
}

// lse from the normalization sum; NaN for a degenerate row (max NaN or +-inf).
template <typename acc_t>
ALCHEMY_HD acc_t topk_lse(acc_t max, acc_t sum) {
  return degenerate(max) ? std::numeric_limits<acc_t>::quiet_NaN() : log_acc(sum);
}

// Gradient of sum_j g_j w_j wrt the logit of selected entry j: inv_t * w_j * (g_j - s), s = sum g w.
template <typename acc_t>
ALCHEMY_HD acc_t topk_selected_grad(acc_t g, acc_t w, acc_t s, acc_t inv_t) {
  return inv_t * w * (g - s);
}

}  // namespace alchemy
