#pragma once
// Host-side planning shared by the CPU and CUDA launchers: views a tensor as
// [outer, classes, inner] around `dim` without copying, and picks the loop shape
// (unit stride along the classes, or along the rows) the kernels run.
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

namespace alchemy {

struct RowStrides {
  int64_t outer, cls, inner;  // element strides of the three collapsed dims
};

struct RowGeometry {
  int64_t outer, classes, inner;
  int64_t rows() const { return outer * inner; }
};

// Collapses dims [begin, end) of t into one (size, stride); nullopt when their
// strides do not nest (e.g. a permuted view), in which case the caller copies.
inline std::optional<std::pair<int64_t, int64_t>> collapse_dims(const at::Tensor& t, int64_t begin,
                                                                int64_t end) {
  int64_t size = 1, stride = 1;
  for (int64_t d = end - 1; d >= begin; --d) {
    const int64_t s = t.size(d);
    if (s == 1) continue;
    if (size == 1) {
      size = s;
      stride = t.stride(d);
    } else if (t.stride(d) == stride * size) {
      size *= s;
    } else {
      return std::nullopt;
    }
  }
  return std::make_pair(size, stride);
}

inline RowGeometry row_geometry(const at::Tensor& t, int64_t dim) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim), inner};
}

inline std::optional<RowStrides> row_strides(const at::Tensor& t, int64_t dim) {
  auto outer = collapse_dims(t, 0, dim);
  auto inner = collapse_dims(t, dim + 1, t.dim());
  if (!outer || !inner) return std::nullopt;
  const int64_t cls = t.size(dim) == 1 ? 1 : t.stride(dim);
  return RowStrides{outer->second, cls, inner->second};
}

// Rows: every operand has unit stride along the class dim (rows are vectorized).
// Lanes: every operand has unit stride along `inner` (vectorized across rows,
// looping over classes), e.g. dim=1 of a contiguous [N, C, H, W].
enum class RowPath { Rows, Lanes };

template <size_t N>
struct RowPlan {
  RowPath path;
  RowGeometry geometry;
  std::array<RowStrides, N> strides;
};

template <size_t N>
std::optional<RowPlan<N>> plan_rows(const std::array<const at::Tensor*, N>& operands, int64_t dim) {
  RowPlan<N> plan{RowPath::Rows, row_geometry(*operands[0], dim), {}};
  for (size_t k = 0; k < N; ++k) {
    auto s = row_strides(*operands[k], dim);
    if (!s) return std::nullopt;
    plan.strides[k] = *s;
  }
  auto all = [&](auto pred) {
    for (const auto& s : plan.strides)
      if (!pred(s)) return false;
    return true;
  };
  if (all([](const RowStrides& s) { return s.cls == 1; })) return plan;
  plan.path = RowPath::Lanes;
  if (plan.geometry.inner > 1 && all([](const RowStrides& s) { return s.inner == 1; })) return plan;
  // A transposed input has its unit stride on the outer dims: swap them with inner.
  if (plan.geometry.outer > 1 && all([](const RowStrides& s) { return s.outer == 1; })) {
    std::swap(plan.geometry.outer, plan.geometry.inner);
    for (auto& s : plan.strides) std::swap(s.outer, s.inner);
    return plan;
  }
  return std::nullopt;
}

}  // namespace alchemy
