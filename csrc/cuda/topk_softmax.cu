// CUDA kernels of topk_softmax_forward / _backward (along the last dim of a contiguous row).
//
// A warp per row for rows up to kWarpRowMaxClasses (every MoE router, any expert count, 8 rows per
// block), a 512-thread block per row beyond. Nothing of the row is held in registers or shared
// memory; every pass re-reads it (from L1/L2 after the first):
//   1. online max / sum-exp (full-row softmax statistics);
//   2. the k-th largest value: bisection over the bits of an order-preserving integer key (one
//      counting pass per bit: 32 for fp32/bf16/fp16, 64 for fp64), then, only when values equal
//      to it must be split, the index bound of the ones taken (lowest indices first);
//   3. the sum of the selected (renormalize) and the lse;
//   4. each thread ranks its selected entries against the row (the count of entries before them
//      in the top-k order) and writes index and weight there. O(k * C / threads) per row: cheap
//      for MoE and sampling k; large k (thousands) is correct but slow.
// Counts and sums are reduced in a fixed order: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <alchemy/online_softmax.h>
#include <alchemy/topk_softmax.h>
#include <alchemy/topk_softmax_host.h>

#include "cuda_common.cuh"

namespace alchemy::cuda {
namespace {

constexpr int kBlockThreads = 512;
constexpr int kWarpRowsPerBlock = 8;  // 256 threads: at 128, ptxas spills the fp64 kernels (exp slow path)
constexpr int64_t kWarpRowMaxClasses = 4096;

template <int kThreads>
__device__ __forceinline__ int64_t row_index() {
  return kThreads == kWarp ? int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y : int64_t(blockIdx.x);
}

template <int kThreads>
__device__ __forceinline__ void row_sync() {
  if constexpr (kThreads == kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Sum over the kThreads threads of a row, the same value in every thread, in a fixed order.
template <int kThreads, typename T>
__device__ T row_total(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if constexpr (kThreads > kWarp) {
    __shared__ T partial[kThreads / kWarp];
    if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = partial[0];
#pragma unroll
    for (int w = 1; w < kThreads / kWarp; ++w) v += partial[w];
    __syncthreads();  // the next call may overwrite partial
  }
  return v;
}

template <int kThreads, typename acc_t>
__device__ SoftmaxStats<acc_t> row_stats_merge(SoftmaxStats<acc_t> st, acc_t inv_t) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const SoftmaxStats<acc_t> other{__shfl_xor_sync(0xffffffffu, st.max, off),
                                    __shfl_xor_sync(0xffffffffu, st.sum, off)};
    st = merge(st, other, inv_t);
  }
  if constexpr (kThreads > kWarp) {
    __shared__ SoftmaxStats<acc_t> partial[kThreads / kWarp];
    if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = st;
    __syncthreads();
    st = partial[0];
    for (int w = 1; w < kThreads / kWarp; ++w) st = merge(st, partial[w], inv_t);
    __syncthreads();
  }
  return st;
}

template <typename scalar_t>
__device__ __forceinline__ auto key_at(const scalar_t* xr, int64_t c) {
  return topk_key(static_cast<acc_type<scalar_t>>(xr[c]));
}

template <int kThreads, typename scalar_t, typename Pred>
__device__ int count_if(const scalar_t* xr, int64_t C, const Pred& pred) {
  int n = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) n += pred(c, key_at(xr, c)) ? 1 : 0;
  return row_total<kThreads>(n);
}

template <int kThreads, typename scalar_t>
__global__ void __launch_bounds__(kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads)
    topk_softmax_forward_rows(const scalar_t* __restrict__ x, acc_type<scalar_t>* __restrict__ weights,
                              int64_t* __restrict__ indices, acc_type<scalar_t>* __restrict__ lse_out, int64_t rows,
                              int64_t C, int k, acc_type<scalar_t> inv_t, bool renormalize) {
  using acc_t = acc_type<scalar_t>;
  using key_t = typename TopkKey<acc_t>::type;
  constexpr int kKeyBits = sizeof(key_t) * 8;
  const int64_t row = row_index<kThreads>();
  if (row >= rows) return;  // uniform per row: whole warps (warp kernel) or blocks exit
  const scalar_t* xr = x + row * C;

  SoftmaxStats<acc_t> st = empty_stats<acc_t>();
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(xr[c])};
    st = accumulate(st, v, inv_t);
  }
  st = row_stats_merge<kThreads>(st, inv_t);

  // t: the largest key with at least k keys >= t, i.e. the k-th largest key.
  key_t t = 0;
  for (int b = kKeyBits - 1; b >= 0; --b) {
    const key_t candidate = t | (key_t(1) << b);
    if (count_if<kThreads>(xr, C, [&](int64_t, key_t key) { return key >= candidate; }) >= k) t = candidate;
  }
  const int above = t == ~key_t(0) ? 0 : count_if<kThreads>(xr, C, [&](int64_t, key_t key) { return key > t; });
  const int need = k - above;  // entries equal to t to take, lowest indices first
  int64_t last = C;            // they are those at index <= last
  if (count_if<kThreads>(xr, C, [&](int64_t, key_t key) { return key == t; }) > need) {
    // the largest j with fewer than `need` equal entries below it: the index of the need-th one
    int64_t j = 0;
    for (int b = 63 - __clzll(C); b >= 0; --b) {
      const int64_t candidate = j | (int64_t(1) << b);
      if (candidate < C &&
          count_if<kThreads>(xr, C, [&](int64_t c, key_t key) { return key == t && c < candidate; }) < need)
        j = candidate;
    }
    last = j;
  }
  auto selected = [&](int64_t c, key_t key) { return key > t || (key == t && c <= last); };

  const acc_t max = st.max;
  acc_t sum = st.sum;
  if (renormalize) {
    acc_t part = 0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const acc_t v = static_cast<acc_t>(xr[c]);
      if (selected(c, topk_key(v))) part += exp_acc((v - finite_shift(max)) * inv_t);
    }
    sum = row_total<kThreads>(part);
  }
  const acc_t lse = topk_lse(max, sum);
  if (threadIdx.x == 0) lse_out[row] = lse;

  acc_t* wr = weights + row * k;
  int64_t* ir = indices + row * k;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t v = static_cast<acc_t>(xr[c]);
    const key_t key = topk_key(v);
    if (!selected(c, key)) continue;
    int rank = 0;
    for (int64_t i = 0; i < C; ++i) {
      const key_t other = key_at(xr, i);
      rank += (other > key || (other == key && i < c)) ? 1 : 0;
    }
    wr[rank] = topk_weight(v, max, lse, inv_t);
    ir[rank] = c;
  }
}

template <int kThreads, typename scalar_t>
__global__ void __launch_bounds__(kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads)
    topk_softmax_backward_rows(const acc_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ x,
                               const acc_type<scalar_t>* __restrict__ weights, const int64_t* __restrict__ indices,
                               const acc_type<scalar_t>* __restrict__ lse, scalar_t* __restrict__ dx, int64_t rows,
                               int64_t C, int k, acc_type<scalar_t> inv_t, bool renormalize) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = row_index<kThreads>();
  if (row >= rows) return;
  const acc_t* gr = grad + row * k;
  const acc_t* wr = weights + row * k;
  const int64_t* ir = indices + row * k;
  const scalar_t* xr = x + row * C;
  scalar_t* dr = dx + row * C;
  acc_t part = 0;
  for (int j = threadIdx.x; j < k; j += kThreads) part += gr[j] * wr[j];
  const acc_t s = row_total<kThreads>(part);
  if (renormalize) {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) dr[c] = static_cast<scalar_t>(acc_t(0));
  } else {
    // every logit: -inv_t * s * p_c, p_c = exp((x_c - max) * inv_t - lse), max the top-1 logit
    const acc_t max = static_cast<acc_t>(xr[ir[0]]), l = lse[row];
    for (int64_t c = threadIdx.x; c < C; c += kThreads)
      dr[c] = static_cast<scalar_t>(-inv_t * s * topk_weight(static_cast<acc_t>(xr[c]), max, l, inv_t));
  }
  row_sync<kThreads>();  // the selected entries below overwrite what other threads wrote above
  for (int j = threadIdx.x; j < k; j += kThreads) dr[ir[j]] = static_cast<scalar_t>(topk_selected_grad(gr[j], wr[j], s, inv_t));
}

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "alchemy_ops: too many rows for one CUDA launch (", work, ")");
  return static_cast<unsigned>(blocks);
}

// Calls launch(threads per row, grid, block): a warp per row up to kWarpRowMaxClasses, else a block.
template <typename Launch>
void launch_rows(int64_t rows, int64_t classes, const Launch& launch) {
  if (classes <= kWarpRowMaxClasses) {
    launch(std::integral_constant<int, kWarp>{}, blocks_for(rows, kWarpRowsPerBlock), dim3(kWarp, kWarpRowsPerBlock));
  } else {
    launch(std::integral_constant<int, kBlockThreads>{}, blocks_for(rows, 1), dim3(kBlockThreads));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_softmax_forward(const at::Tensor& logits, int64_t k,
                                                                    bool renormalize, double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const TopkProblem p = make_topk_problem(logits, k, temperature);
  TORCH_CHECK(p.classes < (int64_t(1) << 31), "alchemy_ops: topk_softmax rows must be shorter than 2^31");
  auto [w, idx, lse] = topk_outputs(logits, k);
  if (p.rows == 0) return {w, idx, lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_topk_softmax", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_rows(p.rows, p.classes, [&](auto threads, unsigned grid, dim3 block) {
      topk_softmax_forward_rows<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(
          p.x.const_data_ptr<scalar_t>(), w.mutable_data_ptr<acc_t>(), idx.mutable_data_ptr<int64_t>(),
          lse.mutable_data_ptr<acc_t>(), p.rows, p.classes, static_cast<int>(k), static_cast<acc_t>(p.inv_t),
          renormalize);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, idx, lse};
}

at::Tensor topk_softmax_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                                 const at::Tensor& indices, const at::Tensor& lse, bool renormalize,
                                 double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const TopkProblem p = make_topk_problem(logits, weights.size(-1), temperature);
  const TopkGradProblem q = make_topk_grad_problem(p, grad_weights, weights, indices, lse);
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  if (p.rows == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "alchemy_topk_softmax_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_rows(p.rows, p.classes, [&](auto threads, unsigned grid, dim3 block) {
      topk_softmax_backward_rows<decltype(threads)::value, scalar_t><<<grid, block, 0, stream>>>(
          q.g.const_data_ptr<acc_t>(), p.x.const_data_ptr<scalar_t>(), q.w.const_data_ptr<acc_t>(),
          q.idx.const_data_ptr<int64_t>(), q.lse.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), p.rows,
          p.classes, static_cast<int>(p.k), static_cast<acc_t>(p.inv_t), renormalize);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("topk_softmax_forward", &topk_softmax_forward);
  m.impl("topk_softmax_backward", &topk_softmax_backward);
}

}  // namespace alchemy::cuda
