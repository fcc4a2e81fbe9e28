#pragma once
// Host-side body of the cross_entropy_* operators, shared by the CPU and CUDA
// registrations: argument checks, the in-place [N, C, inner] view of the logits
// (class dim 1, no permute copy), the target check, output allocation, and the
// contiguous fallback for views that do not collapse.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <tuple>
#include <vector>

#include "cross_entropy.h"
#include "row_layout.h"

namespace alchemy {

// Everything the device kernels need: the logits as rows of `classes` at stride
// xs.cls, one row per position r = o * inner + i at o * xs.outer + i * xs.inner.
struct CrossEntropyProblem {
  at::Tensor x;       // logits, [N, C, inner] collapsible (maybe a contiguous copy of the input)
  at::Tensor target;  // class indices: int64 [N * inner] contiguous; probabilities: x's shape and dtype
  at::Tensor weight;  // [C] contiguous in the accumulation dtype, or undefined
  int64_t outer = 0, classes = 0, inner = 0;
  RowStrides xs{}, ts{};  // ts: the probability target's strides
  bool soft = false;
  std::vector<int64_t> positions;  // shape of the per-position loss / lse
  int64_t ignore_index = -100;
  double smoothing = 0, z_loss = 0, softcap = 0, weight_sum = 0;

  int64_t rows() const { return outer * inner; }
  at::ScalarType acc_dtype() const { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
  template <typename acc_t>
  CrossEntropyConfig<acc_t> config() const {
    return {classes, ignore_index, acc_t(smoothing), acc_t(z_loss), acc_t(softcap), acc_t(weight_sum)};
  }
};

// [N, C, d1, ...] as (N, C, d1 * ...) strides; a 1-d [C] input is one row.
inline std::optional<RowStrides> class_dim_strides(const at::Tensor& t) { return row_strides(t, 1); }

inline at::Tensor as_batch(const at::Tensor& t) { return t.dim() == 1 ? t.unsqueeze(0) : t; }

inline CrossEntropyProblem make_cross_entropy_problem(const at::Tensor& input, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                      double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK(input.dim() >= 1, "alchemy_ops: cross_entropy input must have a class dim, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "alchemy_ops: cross_entropy input must be floating-point, got ",
              input.scalar_type());
  TORCH_CHECK(input.device() == target.device(), "alchemy_ops: input is on ", input.device(), " but target on ",
              target.device());
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "alchemy_ops: label_smoothing must be in [0, 1]");
  TORCH_CHECK(z_loss >= 0 && std::isfinite(z_loss), "alchemy_ops: z_loss must be finite and >= 0");
  TORCH_CHECK(std::isfinite(softcap), "alchemy_ops: softcap must be finite");
  CrossEntropyProblem p;
  p.soft = at::isFloatingType(target.scalar_type());
  p.x = as_batch(input);
  p.outer = p.x.size(0);
  p.classes = p.x.size(1);
  p.inner = p.x.numel() / std::max<int64_t>(p.outer * p.classes, 1);
  if (p.x.numel() == 0) {
    p.inner = 1;
    for (int64_t d = 2; d < p.x.dim(); ++d) p.inner *= p.x.size(d);
  }
  TORCH_CHECK(p.classes > 0, "alchemy_ops: cross_entropy needs at least one class (input.size(1) is 0)");
  p.positions = input.sizes().vec();
  p.positions.erase(p.positions.begin() + (input.dim() == 1 ? 0 : 1));
  if (!class_dim_strides(p.x)) p.x = p.x.contiguous();  // a view whose other dims do not collapse
  p.xs = *class_dim_strides(p.x);
  if (p.soft) {
    TORCH_CHECK(target.sizes() == input.sizes(), "alchemy_ops: probability target has shape ", target.sizes(),
                " but input has shape ", input.sizes(), "; class-index targets must be integer (cast with .long())");
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), "alchemy_ops: probability target dtype ",
                target.scalar_type(), " differs from input dtype ", input.scalar_type());
    p.target = as_batch(target);
    if (!class_dim_strides(p.target)) p.target = p.target.contiguous();
    p.ts = *class_dim_strides(p.target);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "alchemy_ops: class-index target must be int64, got ",
                target.scalar_type(), "; cast with .long()");
    TORCH_CHECK(target.sizes() == at::IntArrayRef(p.positions), "alchemy_ops: target has shape ", target.sizes(),
                " but input ", input.sizes(), " needs ", at::IntArrayRef(p.positions));
    p.target = target.reshape({-1}).contiguous();
  }
  const at::ScalarType acc = p.acc_dtype();
  p.weight_sum = static_cast<double>(p.classes);
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == p.classes, "alchemy_ops: weight must have shape [",
                p.classes, "], got ", weight->sizes());
    TORCH_CHECK(weight->device() == input.device(), "alchemy_ops: weight is on ", weight->device(), " but input on ",
                input.device());
    p.weight = weight->to(acc).contiguous();
    // W is only read with smoothing; summing it syncs a GPU, so only then.
    if (label_smoothing > 0) p.weight_sum = p.weight.sum().item<double>();
  }
  p.ignore_index = ignore_index;
  p.smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap > 0 ? softcap : 0;
  return p;
}

// "position (3, 17)" for flat index `flat` of a tensor of shape `shape`.
inline std::string position_string(int64_t flat, at::IntArrayRef shape) {
  std::vector<int64_t> index(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    index[d] = shape[d] > 0 ? flat % shape[d] : 0;
    flat = shape[d] > 0 ? flat / shape[d] : 0;
  }
  std::ostringstream os;
  os << "(";
  for (size_t d = 0; d < index.size(); ++d) os << (d ? ", " : "") << index[d];
  os << (index.size() == 1 ? ",)" : ")");
  return os.str();
}

// Raises IndexError (Python) naming the first class index outside [0, C) that is not ignore_index.
inline void raise_bad_target(const CrossEntropyProblem& p, int64_t flat, int64_t value) {
  // "Target 7 is out of bounds" is PyTorch's wording, which code written against it matches on.
  TORCH_CHECK_INDEX(false, "alchemy_ops: Target ", value, " is out of bounds (position ",
                    position_string(flat, p.positions), ", ", p.classes, " classes; expected 0 <= target < ",
                    p.classes, " or ignore_index=", p.ignore_index, ")");
}

// Device-generic check with ATen ops (one host sync); the CPU file has a fused loop instead.
inline void check_class_targets_aten(const CrossEntropyProblem& p) {
  const at::Tensor& t = p.target;
  const at::Tensor bad = t.ne(p.ignore_index).logical_and_(t.lt(0).logical_or_(t.ge(p.classes)));
  const at::Tensor where = bad.nonzero();
  if (where.size(0) == 0) return;
  const int64_t flat = where[0][0].item<int64_t>();
  raise_bad_target(p, flat, t[flat].item<int64_t>());
}

inline at::Tensor positions_like(const CrossEntropyProblem& p, const at::Tensor& ref, at::ScalarType dtype) {
  return at::empty({p.rows()}, ref.options().dtype(dtype));
}

// The device files supply:
//   check(p): raises for bad class indices (called only for class-index targets when asked);
//   prepare(t): runs before the first write of a fresh logits-sized output;
//   forward(p, loss, lse, grad_scale): loss and lse per position (flat, contiguous); with a defined
//     grad_scale (one value per position), also overwrites p.x with grad_scale[r] * d loss / d x;
//   backward(p, grad_loss, lse, dx, dx_strides): dx = grad_loss[r] * d loss / d x.
// With grad_scale, `input` receives the gradient (copied back if p.x is a contiguous copy of it).
template <typename Check, typename Forward>
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_host(const at::Tensor& input, const CrossEntropyProblem& p,
                                                              bool check_target, const at::Tensor* grad_scale,
                                                              const Check& check, const Forward& forward) {
  if (grad_scale != nullptr) {
    // Each position rewrites its own row: rows that share memory would race.
    TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes,
                "alchemy_ops: cross_entropy_forward_inplace: input has elements that share memory (e.g. an "
                "expanded tensor); pass a tensor that owns its logits, e.g. input.clone()");
    TORCH_CHECK(grad_scale->device() == input.device(), "alchemy_ops: grad_scale is on ", grad_scale->device(),
                " but input on ", input.device());
  }
  // Checked before anything is written: a bad target must not cost the in-place caller its logits.
  if (check_target && !p.soft && p.rows() > 0) check(p);
  // lse is fp64 whatever the input: see saved_lse in cross_entropy.h.
  at::Tensor loss = positions_like(p, p.x, p.acc_dtype()), lse = positions_like(p, p.x, at::kDouble);
  if (p.rows() > 0) {
    at::Tensor scale;
    if (grad_scale != nullptr) {
      TORCH_CHECK(grad_scale->numel() == p.rows(), "alchemy_ops: grad_scale must have one value per position");
      scale = grad_scale->to(p.acc_dtype()).reshape({-1}).contiguous();
    }
    forward(p, loss, lse, scale);
    if (grad_scale != nullptr && p.x.data_ptr() != input.data_ptr()) as_batch(input).copy_(p.x);
  }
  return {loss.view(p.positions), lse.view(p.positions)};
}

template <typename Prepare, typename Backward>
at::Tensor cross_entropy_backward_host(const CrossEntropyProblem& p, const at::Tensor& input, const at::Tensor& grad_loss,
                                       const at::Tensor& lse, const Prepare& prepare, const Backward& backward) {
  TORCH_CHECK(grad_loss.numel() == p.rows() && lse.numel() == p.rows(),
              "alchemy_ops: grad_loss and lse must have one value per position");
  TORCH_CHECK(grad_loss.device() == input.device() && lse.device() == input.device(),
              "alchemy_ops: grad_loss and lse must be on the input's device (", input.device(), ")");
  at::Tensor dx = at::empty_like(input);
  if (dx.numel() == 0) return dx;
  prepare(dx);
  const at::Tensor g = grad_loss.to(p.acc_dtype()).reshape({-1}).contiguous();
  const at::Tensor l = lse.to(at::kDouble).reshape({-1}).contiguous();
  at::Tensor out = as_batch(dx);
  auto strides = class_dim_strides(out);
  if (!strides) {
    at::Tensor packed = at::empty_like(p.x, p.x.options(), at::MemoryFormat::Contiguous);
    backward(p, g, l, packed, *class_dim_strides(packed));
    out.copy_(packed);
  } else {
    backward(p, g, l, out, *strides);
  }
  return dx;
}

}  // namespace alchemy
