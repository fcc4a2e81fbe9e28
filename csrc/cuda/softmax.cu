// CUDA kernels of softmax_forward / softmax_backward.
//
// Rows with unit class stride: a warp per row for short rows (several rows per
// block), a block per row for long ones; 16-byte vectorized loads/stores when
// every row is aligned; one read for the online statistics (fp32, fp64 for
// fp64) and one for the output. Other layouts (e.g. dim=1 of NCHW): one thread
// per row, adjacent threads on adjacent rows so loads coalesce.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <alchemy/online_softmax.h>
#include <alchemy/softmax_host.h>
#include <alchemy/row_layout.h>

#include "cuda_common.cuh"

namespace alchemy::cuda {
namespace {

constexpr int kBlockThreads = 512;        // block-per-row kernels
constexpr int kWarpRowsPerBlock = 4;      // warp-per-row kernels: 4 rows per 128-thread block
constexpr int64_t kWarpRowMaxClasses = 1024;


struct RowArgs {
  int64_t classes, inner;
  RowStrides s[3];  // per operand: forward (x, y), backward (dy, y, dx)
  __host__ __device__ int64_t offset(int k, int64_t row) const {
    return (row / inner) * s[k].outer + (row % inner) * s[k].inner;
  }
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> warp_merge(SoftmaxStats<acc_t> st, acc_t inv_t, int width) {
  for (int off = width / 2; off > 0; off /= 2) {
    SoftmaxStats<acc_t> other{__shfl_xor_sync(0xffffffffu, st.max, off, width),
                              __shfl_xor_sync(0xffffffffu, st.sum, off, width)};
    st = merge(st, other, inv_t);
  }
  return st;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v, int width) {
  for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, width);
  return v;
}

// Reduces over the kThreads threads of a row: one warp, or the whole block.
template <int kThreads, typename acc_t>
__device__ SoftmaxStats<acc_t> row_merge(SoftmaxStats<acc_t> st, acc_t inv_t) {
  return block_combine<kThreads>(st, empty_stats<acc_t>(),
                                 [&](SoftmaxStats<acc_t> s) { return warp_merge(s, inv_t, kWarp); });
}

template <int kThreads, typename acc_t>
__device__ acc_t row_sum(acc_t v) {
  v = warp_sum(v, kWarp);
  if constexpr (kThreads > kWarp) {
    __shared__ acc_t partial[kThreads / kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = warp_sum(lane < kThreads / kWarp ? partial[lane] : acc_t(0), kWarp);
  }
  return v;
}

// Row index and thread-in-row of this thread for kThreads threads per row.
template <int kThreads>
__device__ __forceinline__ int64_t row_index() {
  return kThreads == kWarp ? int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y : int64_t(blockIdx.x);
}

template <int kThreads, int kPack, typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads)
    softmax_forward_rows(const in_t* __restrict__ x, out_t* __restrict__ y, RowArgs a, int64_t rows,
                         acc_type<in_t> inv_t, bool log) {
  using acc_t = acc_type<in_t>;
  const int64_t row = row_index<kThreads>();
  if (row >= rows) return;  // uniform per row: whole warps (warp kernel) or blocks exit
  const in_t* xr = x + a.offset(0, row);
  out_t* yr = y + a.offset(1, row);
  const int64_t C = a.classes;
  const int64_t packs = kPack > 1 ? C / kPack : 0;
  SoftmaxStats<acc_t> st = empty_stats<acc_t>();
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const Pack<in_t, kPack> in = reinterpret_cast<const Pack<in_t, kPack>*>(xr)[p];
    acc_t v[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) v[j] = static_cast<acc_t>(in.v[j]);
    st = accumulate(st, v, inv_t);
  }
  for (int64_t c = packs * kPack + threadIdx.x; c < C; c += kThreads) {
    const acc_t v[1] = {static_cast<acc_t>(xr[c])};
    st = accumulate(st, v, inv_t);
  }
  const SoftmaxOutput<acc_t> k = output_constants(row_merge<kThreads>(st, inv_t));
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const Pack<in_t, kPack> in = reinterpret_cast<const Pack<in_t, kPack>*>(xr)[p];
    Pack<out_t, kPack> out;
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      out.v[j] = static_cast<out_t>(log ? softmax_output<true>(static_cast<acc_t>(in.v[j]), k, inv_t)
                                        : softmax_output<false>(static_cast<acc_t>(in.v[j]), k, inv_t));
    reinterpret_cast<Pack<out_t, kPack>*>(yr)[p] = out;
  }
  for (int64_t c = packs * kPack + threadIdx.x; c < C; c += kThreads) {
    const acc_t v = static_cast<acc_t>(xr[c]);
    yr[c] = static_cast<out_t>(log ? softmax_output<true>(v, k, inv_t) : softmax_output<false>(v, k, inv_t));
  }
}

template <int kThreads, int kPack, typename scalar_t>
__global__ void __launch_bounds__(kThreads == kWarp ? kWarp * kWarpRowsPerBlock : kThreads)
    softmax_backward_rows(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                          scalar_t* __restrict__ dx, RowArgs a, int64_t rows, acc_type<scalar_t> inv_t, bool log) {
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, kPack>;
  const int64_t row = row_index<kThreads>();
  if (row >= rows) return;
  const scalar_t* dyr = dy + a.offset(0, row);
  const scalar_t* yr = y + a.offset(1, row);
  scalar_t* dxr = dx + a.offset(2, row);
  const int64_t C = a.classes;
  const int64_t packs = kPack > 1 ? C / kPack : 0;
  acc_t dot = 0;
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P g = reinterpret_cast<const P*>(dyr)[p], out = reinterpret_cast<const P*>(yr)[p];
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      dot += log ? static_cast<acc_t>(g.v[j]) : static_cast<acc_t>(g.v[j]) * static_cast<acc_t>(out.v[j]);
  }
  for (int64_t c = packs * kPack + threadIdx.x; c < C; c += kThreads)
    dot += log ? static_cast<acc_t>(dyr[c]) : static_cast<acc_t>(dyr[c]) * static_cast<acc_t>(yr[c]);
  dot = row_sum<kThreads>(dot);
  auto grad = [&](scalar_t g, scalar_t out) {
    const acc_t gv = static_cast<acc_t>(g), ov = static_cast<acc_t>(out);
    return static_cast<scalar_t>(log ? softmax_grad<true>(gv, ov, dot, inv_t) : softmax_grad<false>(gv, ov, dot, inv_t));
  };
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P g = reinterpret_cast<const P*>(dyr)[p], out = reinterpret_cast<const P*>(yr)[p];
    P res;
#pragma unroll
    for (int j = 0; j < kPack; ++j) res.v[j] = grad(g.v[j], out.v[j]);
    reinterpret_cast<P*>(dxr)[p] = res;
  }
  for (int64_t c = packs * kPack + threadIdx.x; c < C; c += kThreads) dxr[c] = grad(dyr[c], yr[c]);
}

// Any class stride: one thread per row.
template <typename in_t, typename out_t>
__global__ void softmax_forward_strided(const in_t* __restrict__ x, out_t* __restrict__ y, RowArgs a, int64_t rows,
                                        acc_type<in_t> inv_t, bool log) {
  using acc_t = acc_type<in_t>;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const in_t* xr = x + a.offset(0, row);
  out_t* yr = y + a.offset(1, row);
  SoftmaxStats<acc_t> st = empty_stats<acc_t>();
  for (int64_t c = 0; c < a.classes; ++c) {
    const acc_t v[1] = {static_cast<acc_t>(xr[c * a.s[0].cls])};
    st = accumulate(st, v, inv_t);
  }
  const SoftmaxOutput<acc_t> k = output_constants(st);
  for (int64_t c = 0; c < a.classes; ++c) {
    const acc_t v = static_cast<acc_t>(xr[c * a.s[0].cls]);
    yr[c * a.s[1].cls] =
        static_cast<out_t>(log ? softmax_output<true>(v, k, inv_t) : softmax_output<false>(v, k, inv_t));
  }
}

template <typename scalar_t>
__global__ void softmax_backward_strided(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                         scalar_t* __restrict__ dx, RowArgs a, int64_t rows,
                                         acc_type<scalar_t> inv_t, bool log) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const scalar_t* dyr = dy + a.offset(0, row);
  const scalar_t* yr = y + a.offset(1, row);
  scalar_t* dxr = dx + a.offset(2, row);
  acc_t dot = 0;
  for (int64_t c = 0; c < a.classes; ++c) {
    const acc_t g = static_cast<acc_t>(dyr[c * a.s[0].cls]);
    dot += log ? g : g * static_cast<acc_t>(yr[c * a.s[1].cls]);
  }
  for (int64_t c = 0; c < a.classes; ++c) {
    const acc_t g = static_cast<acc_t>(dyr[c * a.s[0].cls]), out = static_cast<acc_t>(yr[c * a.s[1].cls]);
    dxr[c * a.s[2].cls] =
        static_cast<scalar_t>(log ? softmax_grad<true>(g, out, dot, inv_t) : softmax_grad<false>(g, out, dot, inv_t));
  }
}

template <size_t N>
RowArgs row_args(const RowPlan<N>& plan) {
  RowArgs a{plan.geometry.classes, plan.geometry.inner, {}};
  for (size_t k = 0; k < N; ++k) a.s[k] = plan.strides[k];
  return a;
}

// Whether every row of every operand starts on a 16-byte pack boundary.
template <size_t N>
bool rows_aligned(const RowPlan<N>& plan, const std::array<const at::Tensor*, N>& t, int pack) {
  for (size_t k = 0; k < N; ++k) {
    const int64_t bytes = int64_t(pack) * t[k]->element_size();
    if (reinterpret_cast<uintptr_t>(t[k]->const_data_ptr()) % bytes != 0) return false;
    // A dim of extent 1 never advances the pointer, whatever stride it reports.
    const int64_t outer = plan.geometry.outer > 1 ? plan.strides[k].outer : 0;
    const int64_t inner = plan.geometry.inner > 1 ? plan.strides[k].inner : 0;
    if ((outer * t[k]->element_size()) % bytes != 0 || (inner * t[k]->element_size()) % bytes != 0) return false;
  }
  return true;
}

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "alchemy_ops: too many rows for one CUDA launch (", work, ")");
  return static_cast<unsigned>(blocks);
}

// Calls launch(threads per row, pack size, grid, block) with the row kernel shape for
// the plan: a warp per row up to kWarpRowMaxClasses classes, else a block per row;
// kPack-wide vector accesses when every row is aligned for them.
template <int kPack, size_t N, typename Launch>
void launch_rows(const RowPlan<N>& plan, bool packed, const Launch& launch) {
  using Warp = std::integral_constant<int, kWarp>;
  using Block = std::integral_constant<int, kBlockThreads>;
  using Packed = std::integral_constant<int, kPack>;
  using Scalar = std::integral_constant<int, 1>;
  const int64_t rows = plan.geometry.rows();
  if (plan.geometry.classes <= kWarpRowMaxClasses) {
    const unsigned grid = blocks_for(rows, kWarpRowsPerBlock);
    const dim3 block(kWarp, kWarpRowsPerBlock);
    packed ? launch(Warp{}, Packed{}, grid, block) : launch(Warp{}, Scalar{}, grid, block);
  } else {
    const unsigned grid = blocks_for(rows, 1);
    packed ? launch(Block{}, Packed{}, grid, dim3(kBlockThreads)) : launch(Block{}, Scalar{}, grid, dim3(kBlockThreads));
  }
}

template <typename in_t, typename out_t>
void launch_forward(const RowPlan<2>& plan, const at::Tensor& x, at::Tensor& y, bool log, double inv_temperature) {
  using acc_t = acc_type<in_t>;
  constexpr int kPack = pack_size<in_t>();
  const RowArgs a = row_args(plan);
  const int64_t rows = plan.geometry.rows();
  const auto inv_t = static_cast<acc_t>(inv_temperature);
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* yp = y.mutable_data_ptr<out_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (plan.path == RowPath::Lanes) {
    softmax_forward_strided<in_t, out_t><<<blocks_for(rows, 256), 256, 0, stream>>>(xp, yp, a, rows, inv_t, log);
  } else {
    launch_rows<kPack>(plan, rows_aligned<2>(plan, {&x, &y}, kPack), [&](auto threads, auto pack, unsigned grid, dim3 block) {
      softmax_forward_rows<decltype(threads)::value, decltype(pack)::value, in_t, out_t>
          <<<grid, block, 0, stream>>>(xp, yp, a, rows, inv_t, log);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_backward(const RowPlan<3>& plan, const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, bool log,
                     double inv_temperature) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kPack = pack_size<scalar_t>();
  const RowArgs a = row_args(plan);
  const int64_t rows = plan.geometry.rows();
  const auto inv_t = static_cast<acc_t>(inv_temperature);
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (plan.path == RowPath::Lanes) {
    softmax_backward_strided<scalar_t><<<blocks_for(rows, 256), 256, 0, stream>>>(dyp, yp, dxp, a, rows, inv_t, log);
  } else {
    launch_rows<kPack>(plan, rows_aligned<3>(plan, {&dy, &y, &dx}, kPack), [&](auto threads, auto pack, unsigned grid, dim3 block) {
      softmax_backward_rows<decltype(threads)::value, decltype(pack)::value, scalar_t>
          <<<grid, block, 0, stream>>>(dyp, yp, dxp, a, rows, inv_t, log);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA kernels take any class stride, so only non-collapsible views are copied.
template <size_t N>
std::optional<RowPlan<N>> plan_cuda(const std::array<const at::Tensor*, N>& t, int64_t dim) {
  auto plan = plan_rows<N>(t, dim);
  if (plan) return plan;
  RowPlan<N> strided{RowPath::Lanes, row_geometry(*t[0], dim), {}};
  for (size_t k = 0; k < N; ++k) {
    auto s = row_strides(*t[k], dim);
    if (!s) return std::nullopt;
    strided.strides[k] = *s;
  }
  return strided;
}

void no_prepare(at::Tensor&) {}

at::Tensor softmax_forward(const at::Tensor& input, int64_t dim, double temperature, bool log,
                           std::optional<at::ScalarType> dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  return softmax_forward_host(input, dim, temperature, dtype, plan_cuda<2>, no_prepare,
                              [&](const RowPlan<2>& plan, const at::Tensor& x, at::Tensor& y, double inv_t,
                                  auto in_tag, auto out_tag) {
                                launch_forward<decltype(in_tag), decltype(out_tag)>(plan, x, y, log, inv_t);
                              });
}

at::Tensor softmax_backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                            double temperature, bool log) {
  const c10::cuda::CUDAGuard guard(output.device());
  return softmax_backward_host(grad_output, output, dim, temperature, plan_cuda<3>, no_prepare,
                               [&](const RowPlan<3>& plan, const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx,
                                   double inv_t, auto tag, auto) {
                                 launch_backward<decltype(tag)>(plan, dy, y, dx, log, inv_t);
                               });
}

}  // namespace

TORCH_LIBRARY_IMPL(alchemy_ops, CUDA, m) {
  m.impl("softmax_forward", &softmax_forward);
  m.impl("softmax_backward", &softmax_backward);
}

}  // namespace alchemy::cuda
