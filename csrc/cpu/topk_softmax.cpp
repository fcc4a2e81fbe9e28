// CPU kernels of topk_softmax_forward / _backward (along the last dim of a contiguous row).
//
// Selection never sorts the row. For k <= kSmallK, a sorted buffer of the k best so far and a
// vectorized prefilter: a vector of the row is only looked at lane by lane when one of its lanes
// can beat the current k-th best (after the first vectors of a random row, rarely). For larger k,
// and for rows holding a NaN, nth_element on the row's indices in the exact order (NaN first),
// then a sort of the k selected. The full-row
// softmax statistics (renormalize=False) come from row_stats of row_stats.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <alchemy/topk_softmax.h>
#include <alchemy/topk_softmax_host.h>

#include "huge_pages.h"
#include "row_stats.h"
#include "vec_math.h"

namespace alchemy::cpu {
namespace {

constexpr int64_t kSmallK = 64;

#if defined(CPU_CAPABILITY_AVX512)
// The vector part of select_small for k <= 16 and fp32 accumulation, with the k best so far held
// sorted in one register (their indices in another): an entry that beats the k-th best goes in with
// one compare, two permutes and two blends, no branch on where. A first pass takes the lane-wise
// max of the row's vectors: the k-th largest of those 16 maxima is a lower bound of the k-th
// largest of the row, so the buffer starts just below it and only the few entries above it go in.
// Returns 1 with the k best of x[0, c) in vals/idx, 0 at a NaN, -1 if the bound is -inf.
template <typename scalar_t>
int select_small_avx512(const scalar_t* x, int64_t C, int64_t k, float* vals, int64_t* idx, int64_t& c) {
  __m512 colmax = load_acc(x);
  for (c = 16; c + 16 <= C; c += 16) colmax = _mm512_max_ps(colmax, load_acc(x + c));
  if (_mm512_cmp_ps_mask(colmax, colmax, _CMP_UNORD_Q) != 0) return 0;
  alignas(64) float v0[16];
  alignas(64) int32_t i0[16];
  _mm512_store_ps(v0, colmax);
  std::nth_element(v0, v0 + (k - 1), v0 + 16, std::greater<float>());
  const float bound = v0[k - 1];
  if (bound == -std::numeric_limits<float>::infinity()) return -1;
  // Below every entry >= bound, so k real entries (the maxima above) displace all of it.
  __m512 best = _mm512_set1_ps(std::nextafter(bound, -std::numeric_limits<float>::infinity()));
  __m512i best_idx = _mm512_setzero_si512();
  const __m512i shift = _mm512_set_epi32(14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);  // lane i <- i - 1
  const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(k - 1));
  __m512 thr = best;
  for (c = 0; c + 16 <= C; c += 16) {
    const __m512 v = load_acc(x + c);
    __mmask16 m = _mm512_cmp_ps_mask(v, thr, _CMP_NLE_UQ);  // > the k-th best, or NaN
    if (m == 0) continue;
    if (_mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q) != 0) return 0;
    do {
      const int j = __builtin_ctz(m);
      const __m512 bv = _mm512_permutexvar_ps(_mm512_set1_epi32(j), v);
      const __mmask16 ge = _mm512_cmp_ps_mask(best, bv, _CMP_GE_OQ);  // a prefix: equal values stay ahead
      const auto at = static_cast<__mmask16>(ge + 1);                  // the lane it goes to
      best = _mm512_mask_mov_ps(_mm512_mask_mov_ps(_mm512_permutexvar_ps(shift, best), ge, best), at, bv);
      best_idx = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(_mm512_permutexvar_epi32(shift, best_idx), ge, best_idx),
                                       at, _mm512_set1_epi32(static_cast<int32_t>(c + j)));
      thr = _mm512_permutexvar_ps(last, best);
      m &= m - 1;
      m &= _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
    } while (m != 0);
  }
  _mm512_store_ps(v0, best);
  _mm512_store_si512(i0, best_idx);
  for (int64_t j = 0; j < k; ++j) {
    vals[j] = v0[j];
    idx[j] = i0[j];
  }
  return 1;
}
#endif

// The k first entries of a row without NaN, into vals/idx (sorted), with plain comparisons: a
// sorted buffer of the k best so far, which a later entry only enters by beating the last one
// strictly (so equal values keep the lower index first). Returns false, leaving the row to the
// exact path, as soon as it meets a NaN.
template <typename scalar_t>
bool select_small(const scalar_t* x, int64_t C, int64_t k, acc_type<scalar_t>* vals, int64_t* idx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  int64_t n = 0;
  auto push = [&](acc_t v, int64_t c) {
    if (v != v) return false;
    int64_t p;
    if (n < k) {
      p = n++;
    } else {
      if (!(v > vals[k - 1])) return true;
      p = k - 1;
    }
    for (; p > 0 && v > vals[p - 1]; --p) {
      vals[p] = vals[p - 1];
      idx[p] = idx[p - 1];
    }
    vals[p] = v;
    idx[p] = c;
    return true;
  };
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (k <= 16 && C >= 16 && C < (int64_t(1) << 31)) {
      const int done = select_small_avx512(x, C, k, vals, idx, c);
      if (done == 0) return false;
      if (done == 1) n = k;  // then the scalar tail below
      if (done == -1) c = 0;
    }
  }
#endif
  for (; c < k; ++c)
    if (!push(static_cast<acc_t>(x[c]), c)) return false;
  for (; c + kVec <= C; c += kVec) {
    // Lanes that may enter: not <= the k-th best (NaN lanes included, so they are seen).
    const Vec v = load_acc(x + c);
    auto mask = static_cast<uint32_t>((v <= Vec(vals[k - 1])).zero_mask());
    if (mask == 0) continue;
    acc_t lanes[kVec];
    v.store(lanes);
    for (; mask != 0; mask &= mask - 1) {
      const int j = __builtin_ctz(mask);
      if (!push(lanes[j], c + j)) return false;
    }
  }
  for (; c < C; ++c)
    if (!push(static_cast<acc_t>(x[c]), c)) return false;
  return true;
}

// Large k, or a row with NaN: nth_element on the indices in the exact order, then a sort of the k selected.
template <typename scalar_t>
void select_large(const scalar_t* x, int64_t C, int64_t k, acc_type<scalar_t>* vals, int64_t* idx) {
  using acc_t = acc_type<scalar_t>;
  thread_local std::vector<int64_t> order;
  thread_local std::vector<acc_t> row;
  order.resize(C);
  row.resize(C);
  for (int64_t c = 0; c < C; ++c) row[c] = static_cast<acc_t>(x[c]);
  std::iota(order.begin(), order.end(), int64_t(0));
  const acc_t* r = row.data();
  auto before = [r](int64_t a, int64_t b) { return topk_before(r[a], a, r[b], b); };
  if (k < C) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  std::sort(order.begin(), order.begin() + k, before);
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = order[j];
    vals[j] = r[order[j]];
  }
}

template <typename scalar_t>
void forward_kernel(const TopkProblem& p, bool renormalize, at::Tensor& w_t, at::Tensor& i_t, at::Tensor& lse_t) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  acc_t* w = w_t.mutable_data_ptr<acc_t>();
  int64_t* ind = i_t.mutable_data_ptr<int64_t>();
  acc_t* lse = lse_t.mutable_data_ptr<acc_t>();
  const int64_t C = p.classes, k = p.k;
  const auto inv_t = static_cast<acc_t>(p.inv_t);
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<acc_t> vals;
    vals.resize(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      int64_t* ir = ind + r * k;
      if (k > kSmallK || !select_small(xr, C, k, vals.data(), ir)) select_large(xr, C, k, vals.data(), ir);
      const acc_t max = vals[0];  // the row max: NaN sorts first
      acc_t sum;
      if (renormalize) {
        sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += exp_acc((vals[j] - max) * inv_t);
      } else {
        const SoftmaxStats<acc_t> st = row_stats(xr, C, inv_t);
        sum = st.max == max ? st.sum : std::numeric_limits<acc_t>::quiet_NaN();  // differ only if degenerate
      }
      const acc_t l = topk_lse(max, sum);
      lse[r] = l;
      acc_t* wr = w + r * k;
      for (int64_t j = 0; j < k; ++j) wr[j] = topk_weight(vals[j], max, l, inv_t);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const TopkProblem& p, const TopkGradProblem& q, bool renormalize, at::Tensor& dx_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const acc_t* g = q.g.const_data_ptr<acc_t>();
  const acc_t* w = q.w.const_data_ptr<acc_t>();
  const int64_t* ind = q.idx.const_data_ptr<int64_t>();
  const acc_t* lse = q.lse.const_data_ptr<acc_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const int64_t C = p.classes, k = p.k;
  const auto inv_t = static_cast<acc_t>(p.inv_t);
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* gr = g + r * k;
      const acc_t* wr = w + r * k;
      const int64_t* ir = ind + r * k;
      const scalar_t* xr = x + r * C;
      scalar_t* dr = dx + r * C;
      acc_t s = 0;
      for (int64_t j = 0; j < k; ++j) s += gr[j] * wr[j];
      if (renormalize) {
        std::memset(static_cast<void*>(dr), 0, C * sizeof(scalar_t));  // all-zero bits are 0 in every float type
      } else {
        // Every logit: -inv_t * s * p_c, p_c = exp((x_c - max) * inv_t - lse), max the top-1 logit.
        const acc_t max = static_cast<acc_t>(xr[ir[0]]), l = lse[r];
        const Vec vmax(max), vinv(inv_t), vl(l), vscale(-inv_t * s);
        int64_t c = 0;
        for (; c + kVec <= C; c += kVec)
          store_acc(dr + c, vscale * fast_exp(at::vec::fmsub(load_acc(xr + c) - vmax, vinv, vl)));
        for (; c < C; ++c) dr[c] = static_cast<scalar_t>(-inv_t * s * topk_weight(static_cast<acc_t>(xr[c]), max, l, inv_t));
      }
      for (int64_t j = 0; j < k; ++j) dr[ir[j]] = static_cast<scalar_t>(topk_selected_grad(gr[j], wr[j], s, inv_t));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_softmax_forward(const at::Tensor& logits, int64_t k,
                                                                    bool renormalize, double temperature) {
  const TopkProblem p = make_topk_problem(logits, k, temperature);
  auto [w, idx, lse] = topk_outputs(logits, k);
  if (p.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_topk_softmax",
                                    [&] { forward_kernel<scalar_t>(p, renormalize, w, idx, lse); });
  }
  return {w, idx, lse};
}

at::Tensor topk_softmax_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                                 const at::Tensor& indices, const at::Tensor& lse, bool renormalize,
                                 double temperature) {
  const TopkProblem p = make_topk_problem(logits, weights.size(-1), temperature);
  const TopkGradProblem q = make_topk_grad_problem(p, grad_weights, weights, indices, lse);
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(dx);
  if (p.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_topk_softmax_backward",
                                    [&] { backward_kernel<scalar_t>(p, q, renormalize, dx); });
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("topk_softmax_forward", &topk_softmax_forward);
  m.impl("topk_softmax_backward", &topk_softmax_backward);
}

}  // namespace alchemy::cpu
