#pragma once
// Small pieces shared by the CUDA kernel files: accumulation type, warp size, 16-byte packs.
#include <cstdint>
#include <type_traits>

namespace alchemy::cuda {

// fp32 accumulation for fp32/bf16/fp16, fp64 for fp64.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kWarp = 32;

// Elements per 16-byte vector load or store.
template <typename T>
constexpr int pack_size() {
  return 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

#if defined(__CUDACC__)
// Combines one value per thread over the kThreads threads of a row (a warp, or a block of
// whole warps): warp_combine within each warp, then across the warps' results through
// shared memory. `identity` fills the lanes past the last warp.
template <int kThreads, typename T, typename WarpCombine>
__device__ __forceinline__ T block_combine(T v, const T& identity, const WarpCombine& warp_combine) {
  v = warp_combine(v);
  if constexpr (kThreads > kWarp) {
    __shared__ T partial[kThreads / kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = warp_combine(lane < kThreads / kWarp ? partial[lane] : identity);
  }
  return v;
}
#endif

}  // namespace alchemy::cuda
