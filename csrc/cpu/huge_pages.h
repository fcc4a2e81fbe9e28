#pragma once
// Large fresh outputs spend much of a memory-bound kernel in 4 KiB page faults;
// advising transparent huge pages before the first touch cuts that ~5x where
// THP is in "madvise" mode. Harmless when the memory is already mapped.
#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>

#include <filesystem>
#include <fstream>
#include <string>
#endif

namespace alchemy::cpu {

#if defined(__linux__)
// Whether a virtio balloon reports free pages to its host (feature bit 5, VIRTIO_BALLOON_F_REPORTING),
// as Firecracker VMs do: the host then discards each free 2 MB block, and the first touch of a huge
// page taken from one is a host fault. Measured on such a VM: the first 256 MB of huge pages a
// process touches take 330-370 ms (4 KiB pages 51 ms, huge pages once warm 22 ms), and a loop of
// log_softmax on [64, 262144] runs 80-97 ms a call for its first calls against eager's 19.
inline bool host_reclaims_free_pages() {
  std::error_code error;
  const std::filesystem::path driver = "/sys/bus/virtio/drivers/virtio_balloon";
  for (const auto& entry : std::filesystem::directory_iterator(driver, error)) {
    std::ifstream features(entry.path() / "features");
    std::string bits;
    if (features >> bits && bits.size() > 5 && bits[5] == '1') return true;
  }
  return false;
}
#endif

// Advises huge pages for t's memory, except where the host reclaims free pages (see above): there
// a huge page is often a slow first touch, and a drop-in must not make a call slower than PyTorch's.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool advise = !host_reclaims_free_pages();
  if (!advise) return;
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace alchemy::cpu
