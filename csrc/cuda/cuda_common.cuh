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

}  // namespace alchemy::cuda
