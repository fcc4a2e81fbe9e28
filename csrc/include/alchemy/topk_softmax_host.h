#pragma once
// Host-side body of topk_softmax_forward / _backward, shared by the CPU and CUDA registrations:
// argument checks and output allocation (contiguous, as the fake kernels promise). The ops work
// along the last dim; the Python API moves any other dim there first.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace alchemy {

struct TopkProblem {
  at::Tensor x;  // contiguous [rows, classes]
  int64_t rows, classes, k;
  double inv_t;
};

inline at::ScalarType topk_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline TopkProblem make_topk_problem(const at::Tensor& logits, int64_t k, double temperature) {
  TORCH_CHECK(logits.dim() >= 1, "alchemy_ops: topk_softmax needs at least one dim");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "alchemy_ops: topk_softmax needs floating-point logits, got ", logits.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "alchemy_ops: temperature must be finite and > 0, got ", temperature);
  const int64_t classes = logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= classes, "alchemy_ops: k must be in [1, ", classes, "], got ", k);
  const at::Tensor x = logits.contiguous();
  return {x, x.numel() / classes, classes, k, 1.0 / temperature};
}

// (weights, indices, lse): [..., k] in the accumulation dtype, [..., k] int64, [...].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_outputs(const at::Tensor& logits, int64_t k) {
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  const auto acc = logits.options().dtype(topk_acc_dtype(logits.scalar_type()));
  at::Tensor lse = at::empty(std::vector<int64_t>(shape.begin(), shape.end() - 1), acc);
  shape.back() = k;
  return {at::empty(shape, acc), at::empty(shape, logits.options().dtype(at::kLong)), lse};
}

// The saved tensors of backward, contiguous, with their shapes checked against the logits.
struct TopkGradProblem {
  at::Tensor g, w, idx, lse;
};

inline TopkGradProblem make_topk_grad_problem(const TopkProblem& p, const at::Tensor& grad_weights,
                                              const at::Tensor& weights, const at::Tensor& indices,
                                              const at::Tensor& lse) {
  const auto acc = topk_acc_dtype(p.x.scalar_type());
  TORCH_CHECK(weights.numel() == p.rows * p.k && indices.numel() == p.rows * p.k &&
                  grad_weights.numel() == p.rows * p.k && lse.numel() == p.rows,
              "alchemy_ops: topk_softmax_backward got saved tensors of the wrong size");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "alchemy_ops: topk_softmax_backward needs int64 indices");
  return {grad_weights.to(acc).contiguous(), weights.to(acc).contiguous(), indices.contiguous(),
          lse.to(acc).contiguous()};
}

}  // namespace alchemy
