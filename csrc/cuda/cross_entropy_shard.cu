// CUDA kernels of cross_entropy_shard_stats / _backward: one shard of a vocabulary split
// over ranks (alchemy/cross_entropy_shard.h); the CPU kernels in csrc/cpu are the spec.
//
// The shard's rows have unit class stride (make_shard_problem), so a position gets a warp
// (4 positions per block) for rows up to kWarpRowMaxClasses and a block beyond, with a
// strided class loop in 16-byte packs when every row is aligned (row_kernels.cuh).
// stats: one read of the row for the online max / sum-exp, merged in a fixed-order tree, and
// with label smoothing a second read (from cache) for sum_c w_c (z_c - finite_shift(max)),
// which needs the final max. backward: one read of the row and one write of its gradient.
// No atomics: bitwise reproducible. Ignored positions never read their row.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include <alchemy/cross_entropy.h>
#include <alchemy/cross_entropy_shard.h>
#include <alchemy/cross_entropy_shard_host.h>
#include <alchemy/online_softmax.h>

#include "cuda_common.cuh"
#include "row_kernels.cuh"

namespace alchemy::cuda {
namespace {

template <typename scalar_t>
struct ShardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;       // rows of `classes` logits at unit stride, row r at r * row_stride
  const int64_t* target;   // [rows]: global class indices or ignore_index
  const acc_t* weight;     // [classes] or nullptr
  int64_t rows, classes, row_stride, class_start, ignore_index;
  acc_t softcap;           // <= 0: none
  bool packed;             // 16-byte chunks: every row of x (and of dx) is 16-byte aligned
};

constexpr int64_t kIgnored = -2;

// The target's column in the shard, -1 for a class of another shard, kIgnored for
// ignore_index. The same for every thread of the position, so branches on it are uniform.
template <typename scalar_t>
__device__ __forceinline__ int64_t target_column(const ShardArgs<scalar_t>& a, int64_t r) {
  const int64_t y = a.target[r];  // one broadcast load per position
  return y == a.ignore_index ? kIgnored : shard_column(y, a.class_start, a.classes);
}

// z[j] = capped logit of class c + j.
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_capped(const ShardArgs<scalar_t>& a, const scalar_t* xr, int64_t c,
                                            acc_t (&z)[N]) {
  load_chunk<N>(xr, c, 1, z);
#pragma unroll
  for (int j = 0; j < N; ++j) z[j] = capped_logit(z[j], a.softcap);
}

template <int kThreads>
constexpr int threads_per_block() {
  return kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads;
}

// out[r] = the kShardStats columns of position r. weight_sum: device scalar, or nullptr for C.
template <int kThreads, typename scalar_t>
__global__ void __launch_bounds__(threads_per_block<kThreads>())
    shard_stats_kernel(ShardArgs<scalar_t> a, const acc_type<scalar_t>* __restrict__ weight_sum, bool smoothing,
                       acc_type<scalar_t>* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kPack = pack_size<scalar_t>();
  const int64_t r = position_index<kThreads>();
  if (r >= a.rows) return;  // uniform per position: whole warps (warp kernel) or blocks exit
  const bool lead = thread_in_row<kThreads>() == 0;
  acc_t* s = out + r * kShardStats;
  const int64_t column = target_column(a, r);
  if (column == kIgnored) {  // zeros but the weight sum, as the CPU kernel
    if (lead) {
#pragma unroll
      for (int k = 0; k < kShardWeightSum; ++k) s[k] = acc_t(0);
      s[kShardWeightSum] = weight_sum != nullptr ? *weight_sum : acc_t(a.classes);
    }
    return;
  }
  const scalar_t* xr = a.x + r * a.row_stride;
  Partial<acc_t> part{empty_stats<acc_t>(), acc_t(0), acc_t(0)};
  for_each_chunk<kThreads, kPack>(a.classes, a.packed, [&](auto n, int64_t c) {
    constexpr int N = decltype(n)::value;
    acc_t z[N];
    load_capped<N>(a, xr, c, z);
    part.st = accumulate(part.st, z, acc_t(1));
  });
  acc_t z_y = 0;
  if (lead && column >= 0) z_y = capped_logit(static_cast<acc_t>(xr[column]), a.softcap);
  // Every thread of the position gets the same (bitwise) statistics.
  const SoftmaxStats<acc_t> st = row_reduce<kThreads>(part, false).st;
  acc_t shifted = 0;
  if (smoothing) {  // a kernel argument: every thread of the block takes the reduction below
    const acc_t m = finite_shift(st.max);  // 0 for a shard of -inf logits: the sum is then -inf
    for_each_chunk<kThreads, kPack>(a.classes, a.packed, [&](auto n, int64_t c) {
      constexpr int N = decltype(n)::value;
      acc_t z[N];
      load_capped<N>(a, xr, c, z);
#pragma unroll
      for (int j = 0; j < N; ++j) shifted += weight_at(a.weight, c + j) * (z[j] - m);
    });
    shifted = row_sum<kThreads>(shifted);
  }
  if (lead) {
    s[kShardMax] = st.max;
    s[kShardLogSum] = shard_log_sum(st);
    s[kShardTargetLogit] = z_y;
    s[kShardTargetWeight] = column >= 0 ? weight_at(a.weight, column) : acc_t(0);
    s[kShardSmoothingSum] = shifted;
    s[kShardWeightSum] = weight_sum != nullptr ? *weight_sum : acc_t(a.classes);
  }
}

// dx[r, c] = (k0 exp(z_c - lse) - k1 w_c - [c == column] k2) dz/dx, 0 for ignored positions.
template <int kThreads, typename scalar_t>
__global__ void __launch_bounds__(threads_per_block<kThreads>())
    shard_backward_kernel(ShardArgs<scalar_t> a, const double* __restrict__ lse,
                          const acc_type<scalar_t>* __restrict__ coeffs, scalar_t* __restrict__ dx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kPack = pack_size<scalar_t>();
  const int64_t r = position_index<kThreads>();
  if (r >= a.rows) return;
  scalar_t* dr = dx + r * a.classes;
  const int64_t column = target_column(a, r);
  if (column == kIgnored) {
    fill_row<kThreads, kPack>(dr, 1, a.classes, a.packed, acc_t(0));
    return;
  }
  const scalar_t* xr = a.x + r * a.row_stride;
  const ShardGradCoeffs<acc_t> k{coeffs[3 * r], coeffs[3 * r + 1], coeffs[3 * r + 2]};
  const SplitLse<acc_t> l = split_lse<acc_t>(lse[r]);
  const bool capped = a.softcap > acc_t(0);
  for_each_chunk<kThreads, kPack>(a.classes, a.packed, [&](auto n, int64_t c) {
    constexpr int N = decltype(n)::value;
    acc_t v[N];
    load_chunk<N>(xr, c, 1, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t w = weight_at(a.weight, c + j);
      if (c + j == column) {  // p_y - 1 formed in acc_t from the unrounded p_y
        v[j] = shard_grad_at_target(v[j], w, l, k, a.softcap);
        continue;
      }
      // One tanh for both the capped logit and its derivative.
      const acc_t th = capped ? tanh_acc(v[j] / a.softcap) : acc_t(0);
      const acc_t z = capped ? a.softcap * th : v[j];
      v[j] = (k.prob * prob_from_lse(z, l) - k.weight * w) * (capped ? acc_t(1) - th * th : acc_t(1));
    }
    store_chunk<N>(dr, c, 1, v);
  });
}

// dx: the gradient's base (rows of `classes`, contiguous), or nullptr for stats.
template <typename scalar_t>
ShardArgs<scalar_t> make_args(const ShardProblem& p, const void* dx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kElem = sizeof(scalar_t), kBytes = kElem * pack_size<scalar_t>();
  ShardArgs<scalar_t> a{};
  a.x = p.x.const_data_ptr<scalar_t>();
  a.target = p.target.const_data_ptr<int64_t>();
  a.weight = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  a.rows = p.rows;
  a.classes = p.classes;
  a.row_stride = p.row_stride;
  a.class_start = p.class_start;
  a.ignore_index = p.ignore_index;
  a.softcap = static_cast<acc_t>(p.softcap);
  a.packed = rows_aligned(a.x, RowStrides{p.row_stride, 1, 0}, p.rows, 1, kElem, kBytes) &&
             (dx == nullptr || rows_aligned(dx, RowStrides{p.classes, 1, 0}, p.rows, 1, kElem, kBytes));
  return a;
}

// Calls launch(kernel for kThreads, grid, block): a warp per position for rows up to
// kWarpRowMaxClasses, a block per position beyond.
template <typename scalar_t, typename Launch>
void launch_shape(const ShardProblem& p, const Launch& launch) {
  constexpr int kBlock = block_threads<scalar_t>();
  if (p.classes <= kWarpRowMaxClasses) {
    launch(std::integral_constant<int, kWarp>{}, blocks_for(p.rows, kWarpRowsPerBlock), dim3(kWarp, kWarpRowsPerBlock));
  } else {
    launch(std::integral_constant<int, kBlock>{}, blocks_for(p.rows, 1), dim3(kBlock));
  }
}

// The kernels behind ShardOps (cross_entropy_shard_host.h).
struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  template <typename scalar_t>
  static void stats(const ShardProblem& p, at::Tensor& out, bool smoothing) {
    using acc_t = acc_type<scalar_t>;
    const ShardArgs<scalar_t> a = make_args<scalar_t>(p, nullptr);
    // Summed on the device (no sync); kept alive by the caching allocator's stream order.
    const at::Tensor weight_sum = p.weight.defined() ? p.weight.sum() : at::Tensor();
    const acc_t* wsum = weight_sum.defined() ? weight_sum.const_data_ptr<acc_t>() : nullptr;
    acc_t* op = out.mutable_data_ptr<acc_t>();
    auto stream = at::cuda::getCurrentCUDAStream();
    launch_shape<scalar_t>(p, [&](auto threads, unsigned grid, dim3 block) {
      shard_stats_kernel<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(a, wsum, smoothing, op);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void backward(const ShardProblem& p, const at::Tensor& lse, const at::Tensor& coeffs, at::Tensor& dx) {
    using acc_t = acc_type<scalar_t>;
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const ShardArgs<scalar_t> a = make_args<scalar_t>(p, dp);
    const double* lp = lse.const_data_ptr<double>();
    const acc_t* kp = coeffs.const_data_ptr<acc_t>();
    auto stream = at::cuda::getCurrentCUDAStream();
    launch_shape<scalar_t>(p, [&](auto threads, unsigned grid, dim3 block) {
      shard_backward_kernel<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(a, lp, kp, dp);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("cross_entropy_shard_stats", &ShardOps<CudaKernels>::stats);
  m.impl("cross_entropy_shard_backward", &ShardOps<CudaKernels>::backward);
}

}  // namespace alchemy::cuda
