#pragma once
// Host-side body of the softmax_forward / softmax_backward operators, shared by
// the CPU and CUDA registrations: argument checks, dtype handling, output
// allocation with the layout the fake kernels promise (empty_like), and the
// contiguous fallback for views the kernels cannot walk in place.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/WrapDimMinimal.h>

#include <cmath>
#include <limits>
#include <optional>

#include "row_layout.h"

namespace alchemy {

inline double checked_inv_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "alchemy_ops: temperature must be finite and > 0, got ", temperature);
  // The kernels multiply by 1/T in fp32.
  TORCH_CHECK(1.0 / temperature <= std::numeric_limits<float>::max(), "alchemy_ops: temperature ", temperature,
              " is too small: 1/temperature overflows float32");
  return 1.0 / temperature;
}

// Calls launch(in_t{}, out_t{}) for the kernels' dtype pairs: the same dtype, or
// fp16/bf16 logits widened to an fp32 output (dtype=torch.float32, no cast pass).
template <typename Launch>
void dispatch_softmax_dtypes(at::ScalarType in, at::ScalarType out, const Launch& launch) {
  if (in == out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "alchemy_softmax", [&] { launch(scalar_t{}, scalar_t{}); });
  } else {
    TORCH_INTERNAL_ASSERT(out == at::kFloat);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(in, "alchemy_softmax", [&] { launch(scalar_t{}, float{}); });
  }
}

// The device files supply three pieces:
//   plan(operands, dim) -> optional<RowPlan<N>>: how the kernels walk these layouts (nullopt: copy first);
//   prepare(out): runs before the first write of a fresh output;
//   launch(plan, tensors..., inv_t, in_t{}, out_t{}): runs the kernels.
template <typename Plan, typename Prepare, typename Launch>
at::Tensor softmax_forward_host(const at::Tensor& input, int64_t dim, double temperature,
                                std::optional<at::ScalarType> dtype, const Plan& plan, const Prepare& prepare,
                                const Launch& launch) {
  const double inv_t = checked_inv_temperature(temperature);
  const auto out_dtype = dtype.value_or(input.scalar_type());
  TORCH_CHECK(at::isFloatingType(out_dtype), "alchemy_ops: softmax needs a floating-point dtype, got ", out_dtype);
  // dtype= casts the input first (PyTorch's semantics); fp16/bf16 -> fp32 is widened in the kernel instead.
  const bool fused_widen = out_dtype == at::kFloat && at::isReducedFloatingType(input.scalar_type());
  at::Tensor x = (fused_widen || out_dtype == input.scalar_type()) ? input : input.to(out_dtype);
  if (x.dim() == 0) x = x.reshape({1});
  dim = c10::maybe_wrap_dim(dim, x.dim());
  auto run = [&](const at::Tensor& xin, at::Tensor& out) {
    const auto p = plan(std::array<const at::Tensor*, 2>{&xin, &out}, dim);
    if (!p) return false;
    dispatch_softmax_dtypes(xin.scalar_type(), out.scalar_type(),
                            [&](auto in_tag, auto out_tag) { launch(*p, xin, out, inv_t, in_tag, out_tag); });
    return true;
  };
  at::Tensor out = at::empty_like(x, x.options().dtype(out_dtype));
  if (out.numel() > 0) {
    prepare(out);
    if (!run(x, out)) {  // e.g. a permuted view whose dims do not collapse
      const at::Tensor xc = x.contiguous();
      at::Tensor packed = at::empty_like(xc, out.options());
      TORCH_INTERNAL_ASSERT(run(xc, packed));
      out.copy_(packed);
    }
  }
  return input.dim() == 0 ? out.reshape({}) : out;
}

// As softmax_forward_host; launch(plan, dy, y, dx, inv_t, scalar_t{}, scalar_t{}).
template <typename Plan, typename Prepare, typename Launch>
at::Tensor softmax_backward_host(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                                 double temperature, const Plan& plan, const Prepare& prepare, const Launch& launch) {
  const double inv_t = checked_inv_temperature(temperature);
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "alchemy_ops: grad_output has shape ", grad_output.sizes(),
              " but output has shape ", output.sizes());
  TORCH_CHECK(at::isFloatingType(output.scalar_type()), "alchemy_ops: softmax output must be floating-point");
  const at::Tensor y = output.dim() == 0 ? output.reshape({1}) : output;
  at::Tensor dy = grad_output.dim() == 0 ? grad_output.reshape({1}) : grad_output;
  // An expanded (stride-0) or differently laid-out gradient is brought to y's layout once.
  if (dy.strides() != y.strides() || dy.scalar_type() != y.scalar_type()) dy = at::empty_like(y).copy_(dy);
  dim = c10::maybe_wrap_dim(dim, y.dim());
  auto run = [&](const at::Tensor& g, const at::Tensor& out, at::Tensor& dx) {
    const auto p = plan(std::array<const at::Tensor*, 3>{&g, &out, &dx}, dim);
    if (!p) return false;
    dispatch_softmax_dtypes(out.scalar_type(), out.scalar_type(),
                            [&](auto tag, auto) { launch(*p, g, out, dx, inv_t, tag, tag); });
    return true;
  };
  at::Tensor dx = at::empty_like(y);
  if (dx.numel() > 0) {
    prepare(dx);
    if (!run(dy, y, dx)) {
      at::Tensor packed = at::empty_like(y.contiguous());
      TORCH_INTERNAL_ASSERT(run(dy.contiguous(), y.contiguous(), packed));
      dx.copy_(packed);
    }
  }
  return output.dim() == 0 ? dx.reshape({}) : dx;
}

}  // namespace alchemy
