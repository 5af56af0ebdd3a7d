#include "core/memory.h"

namespace lk {

namespace {
constexpr int kSlots = kScratchSlots;
struct Scratch {
  AlignedPtr<unsigned char> buf[kSlots];
  size_t size[kSlots] = {};
};
thread_local Scratch t_scratch;
}  // namespace

void* scratch(int slot, size_t bytes) {
  Scratch& s = t_scratch;
  if (bytes > s.size[slot]) {
    s.buf[slot].reset();
    s.size[slot] = 0;
    const size_t grown = bytes + bytes / 4;  // fewer re-allocations as shapes grow
    s.buf[slot] = aligned_alloc_array<unsigned char>(grown);
    s.size[slot] = grown;
  }
  return s.buf[slot].get();
}

}  // namespace lk

#include <map>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lk {

namespace {

constexpr size_t kPoolLimit = size_t{256} << 20;  // bytes kept for reuse, at most

struct OutputPool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // by size
  size_t pooled = 0;
};

OutputPool& output_pool() {
  static OutputPool* p = new OutputPool();  // outlives arrays freed during shutdown
  return *p;
}

size_t block_size(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

}  // namespace

void* output_alloc(size_t bytes) {
  const size_t size = block_size(bytes == 0 ? 1 : bytes);
  OutputPool& pool = output_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    auto it = pool.free_blocks.find(size);
    if (it != pool.free_blocks.end()) {
      void* p = it->second;
      pool.free_blocks.erase(it);
      pool.pooled -= size;
      return p;
    }
  }
  void* p = std::aligned_alloc(kAlign, size);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (size >= (size_t{2} << 20)) madvise(p, size, MADV_HUGEPAGE);  // fewer faults on first touch; advisory
#endif
  return p;
}

void output_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  const size_t size = block_size(bytes == 0 ? 1 : bytes);
  OutputPool& pool = output_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.pooled + size <= kPoolLimit) {
      pool.free_blocks.emplace(size, p);
      pool.pooled += size;
      return;
    }
  }
  std::free(p);
}

void output_pool_trim() {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  for (auto& [size, p] : pool.free_blocks) std::free(p);
  pool.free_blocks.clear();
  pool.pooled = 0;
}

size_t output_pool_bytes() {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  return pool.pooled;
}

}  // namespace lk
