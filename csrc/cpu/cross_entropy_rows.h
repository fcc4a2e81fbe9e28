#pragma once
// Row helpers of the cross-entropy CPU kernels (cross_entropy.cpp, cross_entropy_shard.cpp):
// vectorized row sums, class weights, the gradient row, per-thread row buffers.
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include <alchemy/cross_entropy.h>

#include "vec_math.h"

namespace alchemy::cpu {

// sum_c f(c) over a row: vec_term(c) for kVec lanes at c, scalar_term(c) for the tail;
// four independent accumulators so the adds do not serialize.
template <typename acc_t, typename VecTerm, typename ScalarTerm>
acc_t row_sum(int64_t C, const VecTerm& vec_term, const ScalarTerm& scalar_term) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t c = 0;
  for (; c + 4 * kVec <= C; c += 4 * kVec) {
    ALCHEMY_UNROLL
    for (int j = 0; j < 4; ++j) acc[j] += vec_term(c + j * kVec);
  }
  for (; c + kVec <= C; c += kVec) acc[0] += vec_term(c);
  acc_t sum = reduce_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; c < C; ++c) sum += scalar_term(c);
  return sum;
}

// A row's view for the kernels: contiguous logits z (capped, in the input dtype or acc_t),
// the probability target t (or nullptr), the class weights w (or nullptr).
template <typename acc_t>
struct RowContext {
  const CrossEntropyConfig<acc_t>& cfg;
  const acc_t* w;
};

template <typename acc_t>
inline at::vec::Vectorized<acc_t> load_weight(const acc_t* w, int64_t c) {
  return w ? at::vec::Vectorized<acc_t>::loadu(w + c) : at::vec::Vectorized<acc_t>(1);
}

template <typename acc_t>
inline acc_t weight_at(const acc_t* w, int64_t c) {
  return w ? w[c] : acc_t(1);
}

// sum_c w_c (z_c - max) of a row (w_c = 1 without weights).
template <typename acc_t, typename R>
acc_t shifted_weighted_sum(const R* z, const acc_t* w, int64_t C, acc_t max) {
  const at::vec::Vectorized<acc_t> vmax(max);
  return row_sum<acc_t>(
      C, [&](int64_t c) { return load_weight(w, c) * (load_acc(z + c) - vmax); },
      [&](int64_t c) { return weight_at(w, c) * (static_cast<acc_t>(z[c]) - max); });
}

// Calls f(std::bool_constant<A>{}, ...) for three runtime flags, so the per-element loops
// carry no branches for options that are off.
template <typename F>
void with_flags(bool a, bool b, bool c, const F& f) {
  auto tag = [](bool v, auto then) {
    return v ? then(std::true_type{}) : then(std::false_type{});
  };
  tag(a, [&](auto ta) { tag(b, [&](auto tb) { tag(c, [&](auto tc) { f(ta, tb, tc); }); }); });
}

// w_c t'_c for kVec classes at c (the smoothed probability target, weighted).
template <typename acc_t, typename T>
inline at::vec::Vectorized<acc_t> weighted_prob(const T* t, const acc_t* w, int64_t c,
                                                const CrossEntropyConfig<acc_t>& cfg) {
  using Vec = at::vec::Vectorized<acc_t>;
  return load_weight(w, c) *
         at::vec::fmadd(load_acc(t + c), Vec(acc_t(1) - cfg.smoothing), Vec(cfg.smoothing / acc_t(cfg.classes)));
}

template <typename acc_t, typename T>
inline acc_t weighted_prob_at(const T* t, const acc_t* w, int64_t c, const CrossEntropyConfig<acc_t>& cfg) {
  return weight_at(w, c) * smoothed_prob(static_cast<acc_t>(t[c]), cfg);
}

// dx_c = (ga * p_c - b_c) * dz/dx over a row of logits z (capped when cfg.softcap > 0),
// p_c = exp(z_c - lse), b_c = g * w_c t'_c for a probability target t, else gb * w_c
// (gb without weights); the caller then sets the target class of a class-index row.
// dx may alias z: each element is read before it is written.
template <typename acc_t, typename R, typename T, typename D>
void write_row_grad(const R* z, const T* t, const RowContext<acc_t>& ctx, acc_t ga, acc_t gb, acc_t g,
                    SplitLse<acc_t> lse, D* dx, bool stream) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const auto& cfg = ctx.cfg;
  const int64_t C = cfg.classes;
  const bool soft = t != nullptr;
  with_flags(soft, ctx.w != nullptr, cfg.softcap > 0, [&](auto soft_tag, auto weighted_tag, auto capped_tag) {
    constexpr bool kSoft = decltype(soft_tag)::value, kWeighted = decltype(weighted_tag)::value;
    constexpr bool kCapped = decltype(capped_tag)::value;
    const Vec vga(ga), vgb(gb), vg(g), hi(lse.hi), lo(lse.lo), one(1);
    const Vec inv_cap(kCapped ? acc_t(1) / cfg.softcap : acc_t(0));
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) {
      const Vec zc = load_acc(z + c);
      Vec d;
      if constexpr (kSoft) {
        d = vga * fast_exp((zc - hi) - lo) - vg * weighted_prob(t, ctx.w, c, cfg);
      } else if constexpr (kWeighted) {
        d = vga * fast_exp((zc - hi) - lo) - vgb * Vec::loadu(ctx.w + c);
      } else {
        d = vga * fast_exp((zc - hi) - lo) - vgb;
      }
      if constexpr (kCapped) {
        const Vec th = zc * inv_cap;  // z = softcap * tanh(x / softcap)
        d = d * (one - th * th);
      }
      stream ? store_acc_stream(dx + c, d) : store_acc(dx + c, d);
    }
    for (; c < C; ++c) {
      const acc_t zc = static_cast<acc_t>(z[c]);
      const acc_t b = kSoft ? weighted_prob_at(t, ctx.w, c, cfg) : gb * weight_at(ctx.w, c);
      acc_t d = ga * prob_from_lse(zc, lse) - (kSoft ? g * b : b);
      if constexpr (kCapped) d *= acc_t(1) - (zc / cfg.softcap) * (zc / cfg.softcap);
      dx[c] = static_cast<D>(d);
    }
  });
}

// Per-thread contiguous copies of a row (capped logits, probability target, gradient).
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> z, t;
};

template <typename acc_t>
RowBuffers<acc_t>& row_buffers(int64_t C) {
  thread_local RowBuffers<acc_t> buffers;
  if (static_cast<int64_t>(buffers.z.size()) < C) {
    buffers.z.resize(C);
    buffers.t.resize(C);
  }
  return buffers;
}

// z[c] = capped_logit(x[c * stride]) in acc_t.
template <typename scalar_t, typename acc_t>
void gather_capped(const scalar_t* x, int64_t stride, acc_t softcap, int64_t C, acc_t* z) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  int64_t c = 0;
  if (stride == 1 && softcap > 0) {
    const Vec cap(softcap), inv(acc_t(1) / softcap);
    for (; c + kVec <= C; c += kVec) (cap * (load_acc(x + c) * inv).tanh()).store(z + c);
  }
  for (; c < C; ++c) z[c] = capped_logit(static_cast<acc_t>(x[c * stride]), softcap);
}

}  // namespace alchemy::cpu
