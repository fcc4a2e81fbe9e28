#pragma once
// Host-side body of the cross_entropy_shard_* operators, shared by the CPU and CUDA
// registrations: argument checks, rows with unit class stride, output allocation, dtype
// dispatch (ShardOps).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "cross_entropy_shard.h"

namespace alchemy {

// The logits as `rows` rows of `classes` at unit stride, row r at r * row_stride.
struct ShardProblem {
  at::Tensor x;
  at::Tensor target;  // int64 [rows], contiguous
  at::Tensor weight;  // [classes] in the accumulation dtype, contiguous, or undefined
  int64_t rows = 0, classes = 0, row_stride = 0, class_start = 0, ignore_index = -100;
  double softcap = 0;

  at::ScalarType acc_dtype() const { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
};

inline ShardProblem make_shard_problem(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, int64_t class_start,
                                       int64_t ignore_index, double softcap) {
  TORCH_CHECK(input.dim() == 2, "alchemy_ops: cross_entropy_shard: input must be [N, C], got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "alchemy_ops: cross_entropy_shard: input must be floating-point");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == input.size(0),
              "alchemy_ops: cross_entropy_shard: target must be int64 [", input.size(0), "], got ",
              target.scalar_type(), " ", target.sizes());
  TORCH_CHECK(target.device() == input.device(), "alchemy_ops: target is on ", target.device(), " but input on ",
              input.device());
  TORCH_CHECK(input.size(1) > 0, "alchemy_ops: cross_entropy_shard: a shard needs at least one class");
  TORCH_CHECK(class_start >= 0, "alchemy_ops: cross_entropy_shard: class_start must be >= 0");
  TORCH_CHECK(std::isfinite(softcap), "alchemy_ops: softcap must be finite");
  ShardProblem p;
  p.x = input.stride(1) == 1 ? input : input.contiguous();
  p.rows = p.x.size(0);
  p.classes = p.x.size(1);
  p.row_stride = p.x.stride(0);
  p.target = target.contiguous();
  p.class_start = class_start;
  p.ignore_index = ignore_index;
  p.softcap = softcap > 0 ? softcap : 0;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == p.classes, "alchemy_ops: weight must have shape [",
                p.classes, "], got ", weight->sizes());
    TORCH_CHECK(weight->device() == input.device(), "alchemy_ops: weight is on ", weight->device(), " but input on ",
                input.device());
    p.weight = weight->to(p.acc_dtype()).contiguous();
  }
  return p;
}

// stats(p, out, smoothing) fills out [rows, kShardStats] (contiguous, accumulation dtype).
template <typename Stats>
at::Tensor cross_entropy_shard_stats_host(const ShardProblem& p, bool smoothing, const Stats& stats) {
  at::Tensor out = at::empty({p.rows, kShardStats}, p.x.options().dtype(p.acc_dtype()));
  if (p.rows > 0) stats(p, out, smoothing);
  return out;
}

// backward(p, lse, coeffs, dx) fills dx [rows, classes] (contiguous, the input dtype).
template <typename Backward>
at::Tensor cross_entropy_shard_backward_host(const ShardProblem& p, const at::Tensor& lse, const at::Tensor& coeffs,
                                             const Backward& backward) {
  TORCH_CHECK(lse.numel() == p.rows && coeffs.dim() == 2 && coeffs.size(0) == p.rows && coeffs.size(1) == 3,
              "alchemy_ops: cross_entropy_shard_backward: lse must be [", p.rows, "] and coeffs [", p.rows,
              ", 3], got ", lse.sizes(), " and ", coeffs.sizes());
  TORCH_CHECK(lse.device() == p.x.device() && coeffs.device() == p.x.device(),
              "alchemy_ops: lse and coeffs must be on the input's device (", p.x.device(), ")");
  at::Tensor dx = at::empty({p.rows, p.classes}, p.x.options());
  if (dx.numel() == 0) return dx;
  backward(p, lse.to(at::kDouble).contiguous(), coeffs.to(p.acc_dtype()).contiguous(), dx);
  return dx;
}

// The two operators over one device's kernels, for TORCH_LIBRARY_IMPL:
//   typename Kernels::Guard guard(device)                       held for the call
//   Kernels::stats<scalar_t>(p, out, smoothing)                 fills stats as above
//   Kernels::backward<scalar_t>(p, lse, coeffs, dx)             fills dx as above
template <typename Kernels>
struct ShardOps {
  static at::Tensor stats(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          int64_t class_start, int64_t ignore_index, double softcap, bool smoothing) {
    const typename Kernels::Guard guard(input.device());
    const ShardProblem p = make_shard_problem(input, target, weight, class_start, ignore_index, softcap);
    return cross_entropy_shard_stats_host(p, smoothing, [](const ShardProblem& q, at::Tensor& out, bool s) {
      dispatch(q, [&](auto tag) { Kernels::template stats<decltype(tag)>(q, out, s); });
    });
  }

  static at::Tensor backward(const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& coeffs,
                             int64_t class_start, int64_t ignore_index, double softcap) {
    const typename Kernels::Guard guard(input.device());
    const ShardProblem p = make_shard_problem(input, target, weight, class_start, ignore_index, softcap);
    return cross_entropy_shard_backward_host(
        p, lse, coeffs, [](const ShardProblem& q, const at::Tensor& l, const at::Tensor& k, at::Tensor& dx) {
          dispatch(q, [&](auto tag) { Kernels::template backward<decltype(tag)>(q, l, k, dx); });
        });
  }

 private:
  template <typename Launch>
  static void dispatch(const ShardProblem& p, const Launch& launch) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_cross_entropy_shard",
                                    [&] { launch(scalar_t{}); });
  }
};

// Kernels::Guard of a device that needs none (CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(const c10::Device&) {}
};

}  // namespace alchemy
