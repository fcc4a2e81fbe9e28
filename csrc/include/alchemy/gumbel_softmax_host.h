#pragma once
// Host-side body of gumbel_softmax_forward, shared by the CPU and CUDA registrations:
// argument checks, the contiguous [outer, classes, inner] view the noise is indexed by,
// and output allocation (contiguous, as the fake kernel promises).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/WrapDimMinimal.h>

#include <tuple>

#include "philox.h"
#include "softmax_host.h"

namespace alchemy {

// logits as rows: element (o, c, i) is at (o * classes + c) * inner + i, which is also its
// logical (row-major) index, the Philox counter of its noise (plus the offset).
struct GumbelProblem {
  at::Tensor x;     // contiguous logits
  at::Tensor seed;  // int64 [1] on the logits' device: the Philox key
  int64_t offset = 0;  // added to the logical index: the Philox counter
  int64_t outer = 1, classes = 1, inner = 1;
  int64_t rows() const { return outer * inner; }
};

// Calls launch(problem, y, y_soft (undefined unless wanted), inv_t, hard) and returns (y, y_soft), both
// contiguous; y_soft is the soft sample of hard=True when keep_soft, else an empty [0] tensor.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> gumbel_softmax_forward_host(const at::Tensor& logits, const at::Tensor& seed,
                                                               int64_t offset, double tau, bool hard, bool keep_soft,
                                                               int64_t dim, const Launch& launch) {
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "alchemy_ops: tau must be finite and > 0, got ", tau);
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "alchemy_ops: gumbel_softmax needs floating-point logits, got ",
              logits.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "alchemy_ops: seed must be a one-element int64 tensor");
  TORCH_CHECK(seed.device() == logits.device(), "alchemy_ops: seed is on ", seed.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(offset >= 0, "alchemy_ops: the Philox offset must be >= 0, got ", offset);
  const double inv_t = 1.0 / tau;
  GumbelProblem p;
  p.seed = seed;
  p.offset = offset;
  p.x = logits.dim() == 0 ? logits.reshape({1}) : logits;
  dim = c10::maybe_wrap_dim(dim, p.x.dim());
  p.x = p.x.contiguous();
  for (int64_t d = 0; d < dim; ++d) p.outer *= p.x.size(d);
  p.classes = p.x.size(dim);
  for (int64_t d = dim + 1; d < p.x.dim(); ++d) p.inner *= p.x.size(d);
  at::Tensor y = at::empty(logits.sizes(), logits.options());
  at::Tensor y_soft = (hard && keep_soft) ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  if (y.numel() > 0) launch(p, y, hard && keep_soft ? y_soft : at::Tensor(), inv_t, hard);
  return {y, y_soft};
}

// Checks of philox_uniform; the key of a seed tensor on the CPU (the CUDA kernel reads it on the device).
inline PhiloxKey philox_uniform_key(const at::Tensor& seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "alchemy_ops: seed must be a one-element int64 tensor");
  TORCH_CHECK(offset >= 0 && numel >= 0, "alchemy_ops: offset and numel must be >= 0");
  return seed.is_cpu() ? philox_key(static_cast<uint64_t>(seed.item<int64_t>())) : PhiloxKey{0, 0};
}

}  // namespace alchemy
