// Work-based grain sizes for at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lora_ext::cpu {

// Items per task so that each task does at least this many multiply-adds; smaller
// problems run on the calling thread, where waking the pool would cost more than the
// work (and stalls badly when the cores are oversubscribed).
constexpr int64_t kMinTaskWork = int64_t(1) << 16;

inline int64_t grain_for(int64_t items, int64_t total_work) {
  if (items <= 0) return 1;
  const int64_t per_item = std::max<int64_t>(1, total_work / items);
  return std::max<int64_t>(1, kMinTaskWork / per_item);
}

}  // namespace lora_ext::cpu
