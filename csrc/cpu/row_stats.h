#pragma once
// Softmax statistics (max and sum of exps) of a contiguous row, vectorized, and the parallel
// grain of the row kernels: shared by the softmax and cross-entropy CPU kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <alchemy/online_softmax.h>

#include "vec_math.h"

namespace alchemy::cpu {

// Vectors per online-softmax step: held in registers while their max is taken
// and then exponentiated, so one exp per element and one rescale per step.
constexpr int kVecsPerStep = 8;

// Elements per parallel task of the row kernels, and the fewest elements worth a second thread:
// an OpenMP fork and join costs ~1 µs, the time of a few thousand elements. Measured (Xeon,
// AVX-512, 2 threads; cross_entropy forward): [128, 21] 5.0 µs inline against 5.9 forked, [4, 1000]
// 4.3 against 5.5; [256, 21] 7.5 against 6.9, [8, 1000] level.
constexpr int64_t kElementsPerTask = 1024, kMinParallelElements = 4096;

// The grain for at::parallel_for over `units` of `unit_elements` elements each: tasks of about
// kElementsPerTask elements, or all units in one (parallel_for then runs inline) below
// kMinParallelElements.
inline int64_t task_grain(int64_t units, int64_t unit_elements) {
  unit_elements = std::max<int64_t>(unit_elements, 1);
  if (units * unit_elements < kMinParallelElements) return std::max<int64_t>(units, 1);
  return std::max<int64_t>(1, kElementsPerTask / unit_elements);
}

// Adds the N vectors at x to lane sums kept under `stats.max` (the row max so far).
template <int N, typename scalar_t>
inline void stats_step(const scalar_t* x, SoftmaxStats<acc_type<scalar_t>>& stats, AccVec<scalar_t>& vsum,
                       acc_type<scalar_t> inv_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  Vec v[N];
  ALCHEMY_UNROLL
  for (int j = 0; j < N; ++j) v[j] = load_acc(x + j * Vec::size());
  Vec vmax = v[0];
  ALCHEMY_UNROLL
  for (int j = 1; j < N; ++j) vmax = running_max(vmax, v[j]);
  const acc_t new_max = nan_max(stats.max, reduce_max(vmax));
  if (new_max != stats.max) vsum = vsum * Vec(rescale_factor(stats.max, new_max, inv_t));
  stats.max = new_max;
  // -inf entries give exp(-inf) = 0; a NaN entry makes the sum NaN.
  const Vec shift(finite_shift(new_max)), vinv(inv_t);
  if (inv_t == acc_t(1)) {  // temperature 1 (and cross-entropy): one multiply less per element
    ALCHEMY_UNROLL
    for (int j = 0; j < N; ++j) v[j] = fast_exp(v[j] - shift);
  } else {
    ALCHEMY_UNROLL
    for (int j = 0; j < N; ++j) v[j] = fast_exp((v[j] - shift) * vinv);
  }
  ALCHEMY_UNROLL
  for (int w = 1; w < N; w *= 2)  // pairwise: short dependency chains
    ALCHEMY_UNROLL
    for (int j = 0; j + w < N; j += 2 * w) v[j] = v[j] + v[j + w];
  vsum = vsum + v[0];
}

// Statistics of one contiguous row x[0..C) in one online pass: read once, but a rescale and a
// cross-lane max every kVecsPerStep vectors.
template <typename scalar_t>
inline SoftmaxStats<acc_type<scalar_t>> online_row_stats(const scalar_t* x, int64_t C, acc_type<scalar_t> inv_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  SoftmaxStats<acc_t> stats = empty_stats<acc_t>();
  Vec vsum(0);
  auto step = [&](auto n, int64_t c) { stats_step<decltype(n)::value>(x + c, stats, vsum, inv_t); };
  int64_t c = 0;
  for (; c + kVecsPerStep * kVec <= C; c += kVecsPerStep * kVec) step(std::integral_constant<int, kVecsPerStep>{}, c);
  for (; c + kVec <= C; c += kVec) step(std::integral_constant<int, 1>{}, c);
  stats.sum = reduce_sum(vsum);
  for (; c < C; ++c) {
    const acc_t tail[1] = {static_cast<acc_t>(x[c])};
    stats = accumulate(stats, tail, inv_t);
  }
  return stats;
}

// The max of a contiguous row (a NaN may be dropped: it reaches the sum through exp).
template <typename scalar_t>
inline acc_type<scalar_t> row_max(const scalar_t* x, int64_t C) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  constexpr int kAcc = 4;  // independent maxima: one would serialize on the max latency
  const Vec ninf(neg_inf<acc_type<scalar_t>>());
  Vec vmax[kAcc] = {ninf, ninf, ninf, ninf};
  int64_t c = 0;
  for (; c + kAcc * kVec <= C; c += kAcc * kVec) {
    ALCHEMY_UNROLL
    for (int j = 0; j < kAcc; ++j) vmax[j] = running_max(vmax[j], load_acc(x + c + j * kVec));
  }
  for (; c + kVec <= C; c += kVec) vmax[0] = running_max(vmax[0], load_acc(x + c));
  if (c < C) vmax[1] = running_max(vmax[1], Vec::set(ninf, load_acc(x + c, C - c), C - c));
  return reduce_max(running_max(running_max(vmax[0], vmax[1]), running_max(vmax[2], vmax[3])));
}

// Rows path: statistics of one contiguous row x[0..C). A row of up to kTwoPassMaxBytes in two
// passes, as ATen and Inductor do: the max (a plain streaming read, which the prefetchers keep
// at memory speed), then the sum of exp((x - max) / T) from the core's cache; a longer row in
// one online pass. Measured (Xeon, AVX-512, 2 MB L2 per core): cross_entropy forward fp32
// [4096, 32000] 51 -> 29 ms (torch.compile 45), [64, 262144] 3.3 -> 2.8 ms; rows of 4 MB level.
constexpr int64_t kTwoPassMaxBytes = int64_t(1) << 20;

template <typename scalar_t>
inline SoftmaxStats<acc_type<scalar_t>> row_stats(const scalar_t* x, int64_t C, acc_type<scalar_t> inv_t) {
  using acc_t = acc_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  if (C * static_cast<int64_t>(sizeof(scalar_t)) > kTwoPassMaxBytes) return online_row_stats(x, C, inv_t);
  const acc_t max = row_max(x, C);
  const Vec shift(finite_shift(max)), vinv(inv_t);
  constexpr int kAcc = 2;  // independent sums
  Vec vsum[kAcc] = {Vec(0), Vec(0)};
  int64_t c = 0;
  for (; c + kAcc * kVec <= C; c += kAcc * kVec) {
    ALCHEMY_UNROLL
    for (int j = 0; j < kAcc; ++j) vsum[j] += fast_exp((load_acc(x + c + j * kVec) - shift) * vinv);
  }
  for (; c + kVec <= C; c += kVec) vsum[0] += fast_exp((load_acc(x + c) - shift) * vinv);
  if (c < C) vsum[1] += Vec::set(Vec(0), fast_exp((load_acc(x + c, C - c) - shift) * vinv), C - c);
  const acc_t sum = reduce_sum(vsum[0] + vsum[1]);
  return {std::isnan(sum) ? sum : max, sum};  // a NaN that row_max dropped is the max, as online
}

}  // namespace alchemy::cpu
