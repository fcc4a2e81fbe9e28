// CUDA kernels of cross_entropy_forward / _backward / _forward_inplace.
//
// One body per direction, three shapes of it, picked by kThreads (threads per position):
//   32  (warp per position, 4 positions per block) for unit class stride, 16 < C <= 1024;
//   512 (256 for fp64; block per position, class loop) for unit class stride, longer rows;
//   1   (thread per position, class loop) for any other layout, e.g. dim 1 of NCHW, and
//       for C <= 16: adjacent threads on adjacent positions, so the loads coalesce.
// With unit class stride and 16-byte aligned rows, loads and stores are 16-byte packs
// (a runtime flag, not a template parameter). Forward reads the row once for the
// online statistics and, in the same pass, the label-smoothing sum sum_c w_c (z_c - z_0) or the
// probability-target sums; the in-place variant then writes the gradient over the row
// while it is still in cache. Backward reads the row (and a probability target twice)
// and writes the gradient once. Reductions are fixed-order shuffle / shared-memory
// trees: no atomics, bitwise reproducible. The math is alchemy/cross_entropy.h's.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include <alchemy/cross_entropy.h>
#include <alchemy/cross_entropy_host.h>
#include <alchemy/online_softmax.h>
#include <alchemy/row_layout.h>

#include "cuda_common.cuh"
#include "row_kernels.cuh"

namespace alchemy::cuda {
namespace {

constexpr int64_t kLaneMaxClasses = 16;  // shorter rows: a thread per position whatever the layout

// What a kernel knows about the problem. Pointers to rows are formed per position.
template <typename scalar_t>
struct Args {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;       // logits
  const int64_t* index;    // class-index targets [rows], or nullptr
  const scalar_t* prob;    // probability targets (strides ts), or nullptr
  const acc_t* weight;     // [C] or nullptr
  int64_t rows, inner;
  RowStrides xs, ts;
  CrossEntropyConfig<acc_t> cfg;
  bool packed;             // 16-byte chunks: unit class stride and aligned rows for every operand
};

__host__ __device__ __forceinline__ int64_t row_offset(const RowStrides& s, int64_t o, int64_t i) {
  return o * s.outer + i * s.inner;
}

// dr[c] = g * d loss / d x_c over the row, given lse, the target (class y, or the
// probability row tr) and mass (class_target_mass(w_y), or T). Each x_c is loaded by
// the thread that then stores dr[c], so dr may alias xr element for element.
template <int kThreads, int kPack, typename scalar_t, typename acc_t>
__device__ __forceinline__ void gradient_pass(const Args<scalar_t>& a, const scalar_t* xr, const scalar_t* tr,
                                              int64_t y, acc_t w_y, acc_t mass, acc_t g, SplitLse<acc_t> lse,
                                              scalar_t* dr,
                                              int64_t dcls) {
  const CrossEntropyConfig<acc_t>& cfg = a.cfg;
  const bool soft = tr != nullptr;
  const acc_t coef = grad_prob_coeff(mass, lse, cfg);
  const bool smooth = cfg.smoothing > acc_t(0);
  for_each_chunk<kThreads, kPack>(cfg.classes, a.packed, [&](auto n, int64_t c) {
    constexpr int N = decltype(n)::value;
    acc_t v[N], t[N];
    load_chunk<N>(xr, c, a.xs.cls, v);
    if (soft) load_chunk<N>(tr, c, a.ts.cls, t);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t k = c + j;
      if (!soft && k == y) {  // p_y - 1 formed in acc_t from the unrounded p_y
        v[j] = class_target_grad_at_target(g, v[j], lse, w_y, cfg);
        continue;
      }
      acc_t b;
      if (soft) {
        b = weight_at(a.weight, k) * smoothed_prob(t[j], cfg);
      } else {
        b = smooth ? smoothing_grad_term(weight_at(a.weight, k), cfg) : acc_t(0);
      }
      // One tanh for both the capped logit and its derivative.
      const bool capped = cfg.softcap > acc_t(0);
      const acc_t th = capped ? tanh_acc(v[j] / cfg.softcap) : acc_t(0);
      const acc_t z = capped ? cfg.softcap * th : v[j];
      v[j] = g * (coef * prob_from_lse(z, lse) - b) * (capped ? acc_t(1) - th * th : acc_t(1));
    }
    store_chunk<N>(dr, c, dcls, v);
  });
}

// loss[r], lse[r] per position; with grad_scale, also x = grad_scale[r] * d loss / d x.
template <int kThreads, typename scalar_t>
__device__ __forceinline__ void forward_position(const Args<scalar_t>& a, acc_type<scalar_t>* __restrict__ loss,
                                                 double* __restrict__ lse_out,
                                                 const acc_type<scalar_t>* __restrict__ grad_scale,
                                                 scalar_t* grad) {  // grad: a.x itself (in-place) or nullptr
  using acc_t = acc_type<scalar_t>;
  constexpr int kPack = pack_size<scalar_t>();
  const int64_t r = position_index<kThreads>();
  if (r >= a.rows) return;  // uniform per position: whole warps (warp kernel) or blocks exit
  const CrossEntropyConfig<acc_t>& cfg = a.cfg;
  const int64_t C = cfg.classes;
  const int64_t o = r / a.inner, i = r % a.inner;
  const scalar_t* xr = a.x + row_offset(a.xs, o, i);
  scalar_t* gr = grad != nullptr ? grad + row_offset(a.xs, o, i) : nullptr;
  const bool lead = thread_in_row<kThreads>() == 0;
  const bool soft = a.prob != nullptr;
  const scalar_t* tr = soft ? a.prob + row_offset(a.ts, o, i) : nullptr;

  int64_t y = 0;
  if (!soft) {
    y = a.index[r];  // same address for every thread of the position: one broadcast load
    const bool ignored = y == cfg.ignore_index;
    if (ignored || !target_in_range(y, C)) {  // the row is not read; a bad index is never dereferenced
      const acc_t value = ignored ? acc_t(0) : quiet_nan<acc_t>();
      if (lead) {
        loss[r] = value;
        lse_out[r] = static_cast<double>(value);
      }
      if (gr != nullptr) fill_row<kThreads, kPack>(gr, a.xs.cls, C, a.packed, value);
      return;
    }
  }

  const bool sums = soft || cfg.smoothing > acc_t(0);
  // The sums are taken relative to the row's first logit and moved to its max at the end:
  // sum w (z - max) directly in fp32 would lose its small value under large logits.
  acc_t z_ref = sums ? capped_logit(static_cast<acc_t>(xr[0]), cfg.softcap) : acc_t(0);
  if (!(z_ref > neg_inf<acc_t>() && z_ref < -neg_inf<acc_t>())) z_ref = 0;
  Partial<acc_t> part{empty_stats<acc_t>(), acc_t(0), acc_t(0)};
  for_each_chunk<kThreads, kPack>(C, a.packed, [&](auto n, int64_t c) {
    constexpr int N = decltype(n)::value;
    acc_t z[N];
    load_chunk<N>(xr, c, a.xs.cls, z);
#pragma unroll
    for (int j = 0; j < N; ++j) z[j] = capped_logit(z[j], cfg.softcap);
    part.st = accumulate(part.st, z, acc_t(1));
    if (soft) {
      acc_t t[N];
      load_chunk<N>(tr, c, a.ts.cls, t);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const acc_t q = weight_at(a.weight, c + j) * smoothed_prob(t[j], cfg);
        part.s1 += q;
        part.s2 += q * (z[j] - z_ref);
      }
    } else if (sums) {
#pragma unroll
      for (int j = 0; j < N; ++j) part.s1 += weight_at(a.weight, c + j) * (z[j] - z_ref);
    }
  });
  // The target logit, read by the writing thread before the reduction's barrier, so
  // before the in-place pass overwrites it.
  acc_t x_y = 0;
  if (!soft && lead) x_y = static_cast<acc_t>(xr[y * a.xs.cls]);
  part = row_reduce<kThreads>(part, sums);

  const RowLogSumExp<acc_t> l = row_log_sum_exp(part.st);
  const acc_t w_y = soft ? acc_t(0) : weight_at(a.weight, y);
  if (lead) {
    const acc_t to_max = l.max - z_ref;  // sum w (z - max) = sum w (z - z_ref) - (max - z_ref) sum w
    loss[r] = soft ? prob_target_loss(l, part.s1, part.s2 - to_max * part.s1, cfg)
                   : class_target_loss(l, capped_logit(x_y, cfg.softcap), w_y,
                                       sums ? part.s1 - to_max * cfg.weight_sum : acc_t(0), cfg);
    lse_out[r] = saved_lse(l);
  }
  if (gr == nullptr) return;
  const acc_t mass = soft ? part.s1 : class_target_mass(w_y, cfg);
  gradient_pass<kThreads, kPack>(a, xr, tr, y, w_y, mass, grad_scale[r], split_lse<acc_t>(saved_lse(l)), gr,
                                 a.xs.cls);
}

// dx = grad_loss[r] * d loss / d x, written at the dx strides ds.
template <int kThreads, typename scalar_t>
__device__ __forceinline__ void backward_position(const Args<scalar_t>& a,
                                                  const acc_type<scalar_t>* __restrict__ grad_loss,
                                                  const double* __restrict__ lse_in,
                                                  scalar_t* __restrict__ dx, const RowStrides& ds) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kPack = pack_size<scalar_t>();
  const int64_t r = position_index<kThreads>();
  if (r >= a.rows) return;
  const CrossEntropyConfig<acc_t>& cfg = a.cfg;
  const int64_t C = cfg.classes;
  const int64_t o = r / a.inner, i = r % a.inner;
  const scalar_t* xr = a.x + row_offset(a.xs, o, i);
  scalar_t* dr = dx + row_offset(ds, o, i);
  const bool soft = a.prob != nullptr;
  const scalar_t* tr = soft ? a.prob + row_offset(a.ts, o, i) : nullptr;

  int64_t y = 0;
  acc_t w_y = 0, mass = 0;
  if (!soft) {
    y = a.index[r];
    const bool ignored = y == cfg.ignore_index;
    if (ignored || !target_in_range(y, C)) {
      fill_row<kThreads, kPack>(dr, ds.cls, C, a.packed, ignored ? acc_t(0) : quiet_nan<acc_t>());
      return;
    }
    w_y = weight_at(a.weight, y);
    mass = class_target_mass(w_y, cfg);
  } else {
    acc_t sum = 0;  // T = sum_c w_c t'_c
    for_each_chunk<kThreads, kPack>(C, a.packed, [&](auto n, int64_t c) {
      constexpr int N = decltype(n)::value;
      acc_t t[N];
      load_chunk<N>(tr, c, a.ts.cls, t);
#pragma unroll
      for (int j = 0; j < N; ++j) sum += weight_at(a.weight, c + j) * smoothed_prob(t[j], cfg);
    });
    mass = row_sum<kThreads>(sum);
  }
  gradient_pass<kThreads, kPack>(a, xr, tr, y, w_y, mass, grad_loss[r], split_lse<acc_t>(lse_in[r]), dr, ds.cls);
}

// The kernels. Only the block shape needs launch bounds (<= 128 registers at 512 threads); the others
// go without, because given a block size ptxas may spill to reach the next occupancy step.
template <int kThreads, typename scalar_t>
__global__ void cross_entropy_forward_kernel(Args<scalar_t> a, acc_type<scalar_t>* __restrict__ loss,
                                             double* __restrict__ lse,
                                             const acc_type<scalar_t>* __restrict__ grad_scale, scalar_t* grad) {
  forward_position<kThreads>(a, loss, lse, grad_scale, grad);
}

template <typename scalar_t>
__global__ void __launch_bounds__(block_threads<scalar_t>())
    cross_entropy_forward_block_kernel(Args<scalar_t> a, acc_type<scalar_t>* __restrict__ loss,
                                       double* __restrict__ lse,
                                       const acc_type<scalar_t>* __restrict__ grad_scale, scalar_t* grad) {
  forward_position<block_threads<scalar_t>()>(a, loss, lse, grad_scale, grad);
}

template <int kThreads, typename scalar_t>
__global__ void cross_entropy_backward_kernel(Args<scalar_t> a, const acc_type<scalar_t>* __restrict__ grad_loss,
                                              const double* __restrict__ lse, scalar_t* __restrict__ dx,
                                              RowStrides ds) {
  backward_position<kThreads>(a, grad_loss, lse, dx, ds);
}

template <typename scalar_t>
__global__ void __launch_bounds__(block_threads<scalar_t>())
    cross_entropy_backward_block_kernel(Args<scalar_t> a, const acc_type<scalar_t>* __restrict__ grad_loss,
                                        const double* __restrict__ lse, scalar_t* __restrict__ dx,
                                        RowStrides ds) {
  backward_position<block_threads<scalar_t>()>(a, grad_loss, lse, dx, ds);
}

template <typename scalar_t>
Args<scalar_t> make_args(const CrossEntropyProblem& p) {
  using acc_t = acc_type<scalar_t>;
  Args<scalar_t> a{};
  a.x = p.x.const_data_ptr<scalar_t>();
  a.index = p.soft ? nullptr : p.target.const_data_ptr<int64_t>();
  a.prob = p.soft ? p.target.const_data_ptr<scalar_t>() : nullptr;
  a.weight = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  a.rows = p.rows();
  a.inner = p.inner;
  a.xs = p.xs;
  a.ts = p.ts;
  a.cfg = p.config<acc_t>();
  a.packed = false;
  return a;
}

// Calls launch(threads per position, grid, block) for the shape that fits the layout:
// unit class stride for every operand -> a warp or a block per position (with 16-byte
// chunks when every row is aligned); other layouts and rows of a few classes (a warp
// would idle most lanes and spend more on its shuffles than on the row) -> a thread per
// position. `dx` is the extra output's (base, strides), or base nullptr.
template <typename scalar_t, typename Launch>
void launch_shape(const CrossEntropyProblem& p, Args<scalar_t>& a, const void* dx, const RowStrides& ds,
                  const Launch& launch) {
  constexpr int64_t kElem = sizeof(scalar_t), kBytes = kElem * pack_size<scalar_t>();
  const bool rows = p.xs.cls == 1 && (!p.soft || p.ts.cls == 1) && (dx == nullptr || ds.cls == 1);
  const int64_t n = a.rows;
  if (!rows || p.classes <= kLaneMaxClasses) {
    launch(std::integral_constant<int, 1>{}, blocks_for(n, kLaneThreads), dim3(kLaneThreads));
    return;
  }
  a.packed = rows_aligned(a.x, p.xs, p.outer, p.inner, kElem, kBytes) &&
             (!p.soft || rows_aligned(a.prob, p.ts, p.outer, p.inner, kElem, kBytes)) &&
             (dx == nullptr || rows_aligned(dx, ds, p.outer, p.inner, kElem, kBytes));
  if (p.classes <= kWarpRowMaxClasses) {
    launch(std::integral_constant<int, kWarp>{}, blocks_for(n, kWarpRowsPerBlock), dim3(kWarp, kWarpRowsPerBlock));
  } else {
    launch(std::integral_constant<int, block_threads<scalar_t>()>{}, blocks_for(n, 1), dim3(block_threads<scalar_t>()));
  }
}

template <typename scalar_t>
void launch_forward_typed(const CrossEntropyProblem& p, at::Tensor& loss, at::Tensor& lse,
                          const at::Tensor& grad_scale) {
  using acc_t = acc_type<scalar_t>;
  Args<scalar_t> a = make_args<scalar_t>(p);
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  double* ep = lse.mutable_data_ptr<double>();
  const bool inplace = grad_scale.defined();
  const acc_t* sp = inplace ? grad_scale.const_data_ptr<acc_t>() : nullptr;
  scalar_t* gp = inplace ? p.x.mutable_data_ptr<scalar_t>() : nullptr;  // the gradient overwrites the logits
  auto stream = at::cuda::getCurrentCUDAStream();
  // In place, the gradient goes to x's own rows: x's alignment covers it.
  launch_shape(p, a, nullptr, RowStrides{}, [&](auto threads, unsigned grid, dim3 block) {
    if constexpr (decltype(threads)::value == block_threads<scalar_t>())
      cross_entropy_forward_block_kernel<scalar_t><<<grid, block, 0, stream>>>(a, lp, ep, sp, gp);
    else
      cross_entropy_forward_kernel<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(a, lp, ep, sp, gp);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_backward_typed(const CrossEntropyProblem& p, const at::Tensor& g, const at::Tensor& lse, at::Tensor& dx,
                           const RowStrides& ds) {
  using acc_t = acc_type<scalar_t>;
  Args<scalar_t> a = make_args<scalar_t>(p);
  const acc_t* gp = g.const_data_ptr<acc_t>();
  const double* ep = lse.const_data_ptr<double>();
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_shape(p, a, dp, ds, [&](auto threads, unsigned grid, dim3 block) {
    if constexpr (decltype(threads)::value == block_threads<scalar_t>())
      cross_entropy_backward_block_kernel<scalar_t><<<grid, block, 0, stream>>>(a, gp, ep, dp, ds);
    else
      cross_entropy_backward_kernel<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(a, gp, ep, dp, ds);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Launch>
void dispatch_dtype(const CrossEntropyProblem& p, const Launch& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_cross_entropy_cuda",
                                  [&] { launch(scalar_t{}); });
}

void launch_forward(const CrossEntropyProblem& p, at::Tensor& loss, at::Tensor& lse, const at::Tensor& grad_scale) {
  dispatch_dtype(p, [&](auto tag) { launch_forward_typed<decltype(tag)>(p, loss, lse, grad_scale); });
}

void launch_backward(const CrossEntropyProblem& p, const at::Tensor& g, const at::Tensor& lse, at::Tensor& dx,
                     const RowStrides& ds) {
  dispatch_dtype(p, [&](auto tag) { launch_backward_typed<decltype(tag)>(p, g, lse, dx, ds); });
}

void no_prepare(at::Tensor&) {}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         double softcap, bool check_target) {
  const c10::cuda::CUDAGuard guard(input.device());
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_forward_host(input, p, check_target, nullptr, check_class_targets_aten, launch_forward);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_inplace(at::Tensor& input, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& grad_scale, int64_t ignore_index,
                                                                 double label_smoothing, double z_loss, double softcap,
                                                                 bool check_target) {
  const c10::cuda::CUDAGuard guard(input.device());
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_forward_host(input, p, check_target, &grad_scale, check_class_targets_aten, launch_forward);
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, double softcap) {
  const c10::cuda::CUDAGuard guard(input.device());
  const auto p = make_cross_entropy_problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  return cross_entropy_backward_host(p, input, grad_loss, lse, no_prepare, launch_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
}

}  // namespace alchemy::cuda
