// CUDA kernels of gumbel_softmax_forward and philox_uniform.
//
// The logits are contiguous, viewed as [outer, classes, inner]; element (o, c, i) has the
// logical index (o * classes + c) * inner + i, and its noise is gumbel_noise(key, offset + index)
// (alchemy/philox.h), recomputed in the output pass instead of stored. The seed is read on the
// device (no host sync). Unit-stride rows (inner == 1): a warp per row up to 1024 classes (4 rows
// per block), a 512-thread block per row beyond; the first pass keeps the online max / sum of
// exp((z - max) / tau) of z = x + g and the first index of the max, merged across the row.
// Other rows (dim not last): one thread per row, adjacent threads on adjacent rows (coalesced).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <alchemy/gumbel_softmax_host.h>
#include <alchemy/online_softmax.h>
#include <alchemy/philox.h>

#include "cuda_common.cuh"

namespace alchemy::cuda {
namespace {

constexpr int kBlockThreads = 512;    // block-per-row kernel
constexpr int kWarpRowsPerBlock = 4;  // warp-per-row kernel: 4 rows per 128-thread block
constexpr int64_t kWarpRowMaxClasses = 1024;
constexpr int kStridedThreads = 256;

// The running statistics of one thread (or a merged group): online softmax of z plus the
// first index of its max (ties: lowest index; `index` is INT64_MAX while nothing was seen).
template <typename acc_t>
struct GumbelStats {
  SoftmaxStats<acc_t> softmax;
  acc_t best;
  int64_t index;
};

template <typename acc_t>
__device__ __forceinline__ GumbelStats<acc_t> empty_gumbel_stats() {
  return {empty_stats<acc_t>(), neg_inf<acc_t>(), INT64_MAX};
}

template <typename acc_t>
__device__ __forceinline__ void add_value(GumbelStats<acc_t>& s, acc_t z, int64_t c, acc_t inv_t) {
  const acc_t v[1] = {z};
  s.softmax = accumulate(s.softmax, v, inv_t);
  if (z > s.best) {  // each thread sees its classes in increasing order: strict keeps the first
    s.best = z;
    s.index = c;
  }
}

template <typename acc_t>
__device__ __forceinline__ GumbelStats<acc_t> merge_gumbel(GumbelStats<acc_t> a, GumbelStats<acc_t> b, acc_t inv_t) {
  const bool take_b = b.best > a.best || (b.best == a.best && b.index < a.index);
  return {merge(a.softmax, b.softmax, inv_t), take_b ? b.best : a.best, take_b ? b.index : a.index};
}

template <typename acc_t>
__device__ __forceinline__ GumbelStats<acc_t> warp_merge(GumbelStats<acc_t> s, acc_t inv_t) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const GumbelStats<acc_t> other{{__shfl_xor_sync(0xffffffffu, s.softmax.max, off),
                                    __shfl_xor_sync(0xffffffffu, s.softmax.sum, off)},
                                   __shfl_xor_sync(0xffffffffu, s.best, off),
                                   __shfl_xor_sync(0xffffffffu, s.index, off)};
    s = merge_gumbel(s, other, inv_t);
  }
  return s;
}

// Merges over the kThreads threads of a row: one warp, or the whole block.
template <int kThreads, typename acc_t>
__device__ GumbelStats<acc_t> row_merge(GumbelStats<acc_t> s, acc_t inv_t) {
  return block_combine<kThreads>(s, empty_gumbel_stats<acc_t>(),
                                 [&](GumbelStats<acc_t> v) { return warp_merge(v, inv_t); });
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t perturbed(const scalar_t* xr, int64_t c, int64_t xs, PhiloxKey key, uint64_t counter) {
  return static_cast<acc_t>(xr[c * xs]) + static_cast<acc_t>(gumbel_noise(key, counter));
}

// Writes the outputs of class c given the row constants (NaN constants for a degenerate row).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_outputs(scalar_t* y, scalar_t* y_soft, int64_t at, acc_t z, int64_t c,
                                              const SoftmaxOutput<acc_t>& k, int64_t arg, bool bad, acc_t inv_t,
                                              bool hard) {
  if (!hard || y_soft != nullptr) {
    const acc_t soft = softmax_output<false>(z, k, inv_t);
    (hard ? y_soft : y)[at] = static_cast<scalar_t>(soft);
  }
  if (hard) y[at] = static_cast<scalar_t>(bad ? k.shift : acc_t(c == arg ? 1 : 0));  // k.shift is NaN when bad
}

template <int kThreads>
__device__ __forceinline__ int64_t row_index() {
  return kThreads == kWarp ? int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y : int64_t(blockIdx.x);
}

template <int kThreads, typename scalar_t>
__global__ void __launch_bounds__(kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads)
    gumbel_softmax_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, scalar_t* __restrict__ y_soft,
                        const int64_t* __restrict__ seed, uint64_t offset, int64_t C, int64_t rows,
                        acc_type<scalar_t> inv_t, bool hard) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = row_index<kThreads>();
  if (row >= rows) return;  // uniform per row: whole warps (warp kernel) or blocks exit
  const PhiloxKey key = philox_key(static_cast<uint64_t>(__ldg(seed)));
  const scalar_t* xr = x + row * C;
  const uint64_t base = offset + uint64_t(row) * uint64_t(C);
  GumbelStats<acc_t> s = empty_gumbel_stats<acc_t>();
  for (int64_t c = threadIdx.x; c < C; c += kThreads)
    add_value(s, perturbed<scalar_t, acc_t>(xr, c, 1, key, base + c), c, inv_t);
  s = row_merge<kThreads>(s, inv_t);
  const SoftmaxOutput<acc_t> k = output_constants(s.softmax);
  const bool bad = degenerate(s.softmax.max);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t z = hard && y_soft == nullptr ? acc_t(0) : perturbed<scalar_t, acc_t>(xr, c, 1, key, base + c);
    write_outputs(y, y_soft, row * C + c, z, c, k, s.index, bad, inv_t, hard);
  }
}

// Any row of the [outer, classes, inner] view: one thread per row, classes `inner` apart.
template <typename scalar_t>
__global__ void __launch_bounds__(kStridedThreads)
    gumbel_softmax_strided(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, scalar_t* __restrict__ y_soft,
                           const int64_t* __restrict__ seed, uint64_t offset, int64_t C, int64_t inner,
                           int64_t rows, acc_type<scalar_t> inv_t, bool hard) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const PhiloxKey key = philox_key(static_cast<uint64_t>(__ldg(seed)));
  const int64_t start = (row / inner) * C * inner + row % inner;
  const scalar_t* xr = x + start;
  GumbelStats<acc_t> s = empty_gumbel_stats<acc_t>();
  for (int64_t c = 0; c < C; ++c)
    add_value(s, perturbed<scalar_t, acc_t>(xr, c, inner, key, offset + uint64_t(start + c * inner)), c, inv_t);
  const SoftmaxOutput<acc_t> k = output_constants(s.softmax);
  const bool bad = degenerate(s.softmax.max);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = start + c * inner;
    const acc_t z = hard && y_soft == nullptr ? acc_t(0) : perturbed<scalar_t, acc_t>(xr, c, inner, key, offset + uint64_t(at));
    write_outputs(y, y_soft, at, z, c, k, s.index, bad, inv_t, hard);
  }
}

__global__ void __launch_bounds__(256)
    philox_uniform_kernel(float* __restrict__ u, const int64_t* __restrict__ seed, uint64_t offset, int64_t numel) {
  const PhiloxKey key = philox_key(static_cast<uint64_t>(__ldg(seed)));
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < numel; k += int64_t(gridDim.x) * blockDim.x)
    u[k] = uniform_from_bits(philox_bits(key, offset + uint64_t(k)));
}

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "alchemy_ops: too many rows for one CUDA launch (", work, ")");
  return static_cast<unsigned>(blocks);
}

void gumbel_launch(const GumbelProblem& p, at::Tensor& y, const at::Tensor& y_soft, double inv_temperature,
                   bool hard) {
  const int64_t rows = p.rows(), C = p.classes;
  const int64_t* seed = p.seed.const_data_ptr<int64_t>();
  const auto offset = static_cast<uint64_t>(p.offset);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_gumbel_softmax", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = p.x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = y_soft.defined() ? y_soft.mutable_data_ptr<scalar_t>() : nullptr;
    const auto inv_t = static_cast<acc_t>(inv_temperature);
    if (p.inner > 1) {
      gumbel_softmax_strided<scalar_t><<<blocks_for(rows, kStridedThreads), kStridedThreads, 0, stream>>>(
          xp, yp, sp, seed, offset, C, p.inner, rows, inv_t, hard);
    } else if (C <= kWarpRowMaxClasses) {
      gumbel_softmax_rows<kWarp, scalar_t><<<blocks_for(rows, kWarpRowsPerBlock), dim3(kWarp, kWarpRowsPerBlock), 0,
                                             stream>>>(xp, yp, sp, seed, offset, C, rows, inv_t, hard);
    } else {
      gumbel_softmax_rows<kBlockThreads, scalar_t>
          <<<blocks_for(rows, 1), kBlockThreads, 0, stream>>>(xp, yp, sp, seed, offset, C, rows, inv_t, hard);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_forward(const at::Tensor& logits, const at::Tensor& seed,
                                                          int64_t offset, double tau, bool hard, bool keep_soft,
                                                          int64_t dim) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return gumbel_softmax_forward_host(logits, seed, offset, tau, hard, keep_soft, dim, gumbel_launch);
}

at::Tensor philox_uniform(const at::Tensor& seed, int64_t offset, int64_t numel) {
  const c10::cuda::CUDAGuard guard(seed.device());
  philox_uniform_key(seed, offset, numel);  // the checks; the kernel reads the seed on the device
  at::Tensor u = at::empty({numel}, seed.options().dtype(at::kFloat));
  if (numel > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + 255) / 256, 65535));
    philox_uniform_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        u.mutable_data_ptr<float>(), seed.const_data_ptr<int64_t>(), static_cast<uint64_t>(offset), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return u;
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("gumbel_softmax_forward", &gumbel_softmax_forward);
  m.impl("philox_uniform", &philox_uniform);
}

}  // namespace alchemy::cuda
