// CPU kernels of cross_entropy_shard_stats / _backward: one shard of a vocabulary split
// over ranks (alchemy/cross_entropy_shard.h). A position's row is read once for its
// statistics (the target logit and smoothing sum while it is in cache) and once more,
// with the write of its gradient, in backward. Softcapped rows go through a per-thread
// buffer of capped logits, as in cross_entropy.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <alchemy/cross_entropy_shard.h>
#include <alchemy/cross_entropy_shard_host.h>

#include "cross_entropy_rows.h"
#include "huge_pages.h"
#include "row_stats.h"

namespace alchemy::cpu {
namespace {

// Runs body(r, column, z) over the positions that are not ignored, in parallel: column is
// the target's column in the shard (or -1), z the row's logits (capped when softcapped).
template <typename scalar_t, typename Body>
void for_each_shard_row(const ShardProblem& p, const Body& body) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  const auto softcap = static_cast<acc_t>(p.softcap);
  const int64_t grain = std::max<int64_t>(1, 32768 / p.classes);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    RowBuffers<acc_t>& buf = row_buffers<acc_t>(p.classes);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * p.row_stride;
      const int64_t column = target[r] == p.ignore_index ? -2 : shard_column(target[r], p.class_start, p.classes);
      if (column == -2) {
        body(r, column, xr);
      } else if (softcap > 0) {
        gather_capped(xr, 1, softcap, p.classes, buf.z.data());
        body(r, column, static_cast<const acc_t*>(buf.z.data()));
      } else {
        body(r, column, xr);
      }
    }
    stream_fence();
  });
}

template <typename scalar_t>
void launch_stats(const ShardProblem& p, at::Tensor& out, bool smoothing) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t weight_sum = w ? p.weight.sum().item<acc_t>() : acc_t(p.classes);
  acc_t* stats = out.mutable_data_ptr<acc_t>();
  for_each_shard_row<scalar_t>(p, [&](int64_t r, int64_t column, const auto* z) {
    acc_t* s = stats + r * kShardStats;
    s[kShardWeightSum] = weight_sum;
    if (column == -2) {  // ignored: nothing to report
      s[kShardMax] = s[kShardLogSum] = s[kShardTargetLogit] = s[kShardTargetWeight] = s[kShardSmoothingSum] = 0;
      return;
    }
    const SoftmaxStats<acc_t> row = row_stats(z, p.classes, acc_t(1));
    s[kShardMax] = row.max;
    s[kShardLogSum] = shard_log_sum(row);
    s[kShardTargetLogit] = column >= 0 ? static_cast<acc_t>(z[column]) : acc_t(0);
    s[kShardTargetWeight] = column >= 0 ? weight_at(w, column) : acc_t(0);
    s[kShardSmoothingSum] = smoothing ? shifted_weighted_sum(z, w, p.classes, finite_shift(row.max)) : acc_t(0);
  });
}

template <typename scalar_t>
void launch_backward(const ShardProblem& p, const at::Tensor& lse_t, const at::Tensor& coeffs_t, at::Tensor& dx_t) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg{p.classes, p.ignore_index, 0, 0, static_cast<acc_t>(p.softcap), 0};
  const RowContext<acc_t> ctx{cfg, p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr};
  const double* lse = lse_t.const_data_ptr<double>();
  const acc_t* coeffs = coeffs_t.const_data_ptr<acc_t>();
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const bool stream = dx_t.nbytes() > (int64_t(64) << 20);  // as in cross_entropy.cpp
  for_each_shard_row<scalar_t>(p, [&](int64_t r, int64_t column, const auto* z) {
    scalar_t* dr = dx + r * p.classes;
    if (column == -2) {
      std::fill(dr, dr + p.classes, scalar_t(0));
      return;
    }
    const ShardGradCoeffs<acc_t> k{coeffs[3 * r], coeffs[3 * r + 1], coeffs[3 * r + 2]};
    const SplitLse<acc_t> split = split_lse<acc_t>(lse[r]);
    const acc_t x_target = column >= 0 ? static_cast<acc_t>(x[r * p.row_stride + column]) : acc_t(0);
    write_row_grad(z, static_cast<const acc_t*>(nullptr), ctx, k.prob, k.weight, acc_t(0), split, dr, stream);
    if (column >= 0)  // p_y - 1 formed in acc_t, rounded once
      dr[column] = static_cast<scalar_t>(
          shard_grad_at_target(x_target, weight_at(ctx.w, column), split, k, static_cast<acc_t>(p.softcap)));
  });
}

struct CpuKernels {
  using Guard = NoDeviceGuard;
  template <typename scalar_t>
  static void stats(const ShardProblem& p, at::Tensor& out, bool smoothing) {
    launch_stats<scalar_t>(p, out, smoothing);
  }
  template <typename scalar_t>
  static void backward(const ShardProblem& p, const at::Tensor& lse, const at::Tensor& coeffs, at::Tensor& dx) {
    advise_huge_pages(dx);
    launch_backward<scalar_t>(p, lse, coeffs, dx);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CPU, m) {
  m.impl("cross_entropy_shard_stats", &ShardOps<CpuKernels>::stats);
  m.impl("cross_entropy_shard_backward", &ShardOps<CpuKernels>::backward);
}

}  // namespace alchemy::cpu
