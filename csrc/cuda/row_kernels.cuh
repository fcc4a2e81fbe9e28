#pragma once
// The row machinery of the cross-entropy kernels (cross_entropy.cu, cross_entropy_shard.cu):
// kThreads threads per position (1, a warp, or a block), the class loop in 16-byte packs,
// the fixed-order row reductions (no atomics: bitwise reproducible) and the launch helpers.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include <alchemy/online_softmax.h>
#include <alchemy/row_layout.h>

#include "cuda_common.cuh"

namespace alchemy::cuda {

// Block-per-position kernels: 512 threads; 256 for fp64, whose row state needs more than
// the 128 registers a 512-thread block allows.
template <typename scalar_t>
constexpr int block_threads() {
  return std::is_same_v<scalar_t, double> ? 256 : 512;
}
constexpr int kWarpRowsPerBlock = 4;   // warp-per-position kernels: 4 positions per 128-thread block
constexpr int kLaneThreads = 256;      // thread-per-position kernels
constexpr int64_t kWarpRowMaxClasses = 1024;  // longer rows: a block per position

// The position this thread works on and its index among the kThreads threads of that position.
template <int kThreads>
__device__ __forceinline__ int64_t position_index() {
  if constexpr (kThreads == 1) return int64_t(blockIdx.x) * kLaneThreads + threadIdx.x;
  if constexpr (kThreads == kWarp) return int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y;
  return int64_t(blockIdx.x);
}

template <int kThreads>
__device__ __forceinline__ int thread_in_row() {
  return kThreads == 1 ? 0 : int(threadIdx.x);
}

// Calls f(std::integral_constant<int, N>, c) for the classes [c, c + N) this thread owns:
// kPack-wide chunks (only when `packed`, which implies unit stride and aligned rows),
// then single classes. Consecutive threads take consecutive chunks, so accesses coalesce.
template <int kThreads, int kPack, typename F>
__device__ __forceinline__ void for_each_chunk(int64_t C, bool packed, const F& f) {
  const int t = thread_in_row<kThreads>();
  int64_t first = 0;
  if constexpr (kThreads > 1 && kPack > 1) {
    const int64_t packs = packed ? C / kPack : 0;
    for (int64_t p = t; p < packs; p += kThreads) f(std::integral_constant<int, kPack>{}, p * kPack);
    first = packs * kPack;
  }
  for (int64_t c = first + t; c < C; c += kThreads) f(std::integral_constant<int, 1>{}, c);
}

// v[j] = acc(row[(c + j) * stride]); N > 1 only with stride 1 and a pack-aligned row.
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void load_chunk(const T* row, int64_t c, int64_t stride, acc_t (&v)[N]) {
  if constexpr (N == 1) {
    v[0] = static_cast<acc_t>(row[c * stride]);
  } else {
    const Pack<T, N> in = *reinterpret_cast<const Pack<T, N>*>(row + c);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = static_cast<acc_t>(in.v[j]);
  }
}

template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_chunk(T* row, int64_t c, int64_t stride, const acc_t (&v)[N]) {
  if constexpr (N == 1) {
    row[c * stride] = static_cast<T>(v[0]);
  } else {
    Pack<T, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = static_cast<T>(v[j]);
    *reinterpret_cast<Pack<T, N>*>(row + c) = out;
  }
}

// One position's partial reduction: softmax statistics of the (capped) logits and two sums
// (cross_entropy.cu: s1 = sum_c w_c z_c for class indices; s1 = T = sum_c w_c t'_c and
// s2 = S = sum_c w_c t'_c z_c for probabilities).
template <typename acc_t>
struct Partial {
  SoftmaxStats<acc_t> st;
  acc_t s1, s2;
};

// Butterfly over the warp: every lane ends with the warp's result. `sums` is uniform
// across the warp (a kernel argument), so the conditional shuffles keep the full mask.
template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> warp_reduce(Partial<acc_t> v, bool sums) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const SoftmaxStats<acc_t> other{__shfl_xor_sync(0xffffffffu, v.st.max, off),
                                    __shfl_xor_sync(0xffffffffu, v.st.sum, off)};
    // Both partners compute merge(lower lane, upper lane): a * ra + b * rb contracts to an fma
    // that is not symmetric in a and b, and every lane must end with the same sum.
    v.st = (threadIdx.x & off) ? merge(other, v.st, acc_t(1)) : merge(v.st, other, acc_t(1));
    if (sums) {
      v.s1 += __shfl_xor_sync(0xffffffffu, v.s1, off);
      v.s2 += __shfl_xor_sync(0xffffffffu, v.s2, off);
    }
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Reduces over the kThreads threads of a position; every one of them gets the result.
// The block version ends with a __syncthreads (between the shared writes and reads), so
// global loads issued before it are ordered before any thread's later stores.
template <int kThreads, typename acc_t>
__device__ __forceinline__ Partial<acc_t> row_reduce(Partial<acc_t> v, bool sums) {
  if constexpr (kThreads == 1) {
    return v;
  } else {
    v = block_combine<kThreads>(v, Partial<acc_t>{empty_stats<acc_t>(), acc_t(0), acc_t(0)},
                                [&](Partial<acc_t> p) { return warp_reduce(p, sums); });
    if constexpr (kThreads <= kWarp) {
      __syncwarp();  // memory order among the lanes, as the block version's barrier
    }
    return v;
  }
}

template <int kThreads, typename acc_t>
__device__ __forceinline__ acc_t row_sum(acc_t v) {
  if constexpr (kThreads == 1) {
    return v;
  } else {
    return block_combine<kThreads>(v, acc_t(0), [](acc_t s) { return warp_sum(s); });
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_at(const acc_t* w, int64_t c) {
  return w != nullptr ? w[c] : acc_t(1);
}

// Writes value over a whole gradient row (e.g. 0 for an ignored position).
template <int kThreads, int kPack, typename scalar_t, typename acc_t>
__device__ __forceinline__ void fill_row(scalar_t* dr, int64_t cls, int64_t C, bool packed, acc_t value) {
  for_each_chunk<kThreads, kPack>(C, packed, [&](auto n, int64_t c) {
    constexpr int N = decltype(n)::value;
    acc_t v[N];
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = value;
    store_chunk<N>(dr, c, cls, v);
  });
}

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "alchemy_ops: too many positions for one CUDA launch (", work, ")");
  return static_cast<unsigned>(blocks);
}

// Whether every row of t (strides s over outer x inner positions) starts on a `bytes` boundary.
inline bool rows_aligned(const void* base, const RowStrides& s, int64_t outer, int64_t inner, int64_t elem, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(base) % bytes != 0) return false;
  // A dim of extent 1 never advances the pointer, whatever stride it reports.
  const int64_t so = outer > 1 ? s.outer : 0, si = inner > 1 ? s.inner : 0;
  return (so * elem) % bytes == 0 && (si * elem) % bytes == 0;
}

}  // namespace alchemy::cuda
