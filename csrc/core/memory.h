// Aligned storage for packed weights, and per-thread scratch space that is
// reused across calls so steady-state runs allocate nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace lk {

constexpr size_t kAlign = 64;  // one cache line, one AVX-512 register

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
using AlignedPtr = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedPtr<T> aligned_alloc_array(size_t n) {
  size_t bytes = n * sizeof(T);
  if (n != 0 && bytes / n != sizeof(T)) throw std::bad_alloc();
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, bytes == 0 ? kAlign : bytes);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedPtr<T>(static_cast<T*>(p));
}

// Scratch memory owned by the calling thread, valid until its next call to
// scratch() with the same slot. Each use has its own slot, so a task can hold
// several buffers at once (a fused task holds its band while tiles pack).
enum ScratchSlot {
  kPackSlot = 0,        // packed GEMM operands of one tile
  kFusedBandSlot = 1,   // the convolution rows a fused conv+pool task pools
  kImageSlot = 2,       // a whole image's im2col (im2col_gemm, held by the calling thread)
  kInputBandSlot = 3,   // a padded band of the input (indirect_gemm)
  kTileSlot = 4,        // an output tile accumulated before it is stored (transposed GEMMs)
  kPointerSlot = 5,     // per-pixel input pointers (indirect_gemm)
  kWeightSlot = 6,      // weights packed for one run (held by the calling thread)
  kPoolBandSlot = 7,    // input rows with a column stride gathered for max-pooling
  kScratchSlots
};
void* scratch(int slot, size_t bytes);

template <class T>
T* scratch_array(int slot, size_t n) {
  if (n > SIZE_MAX / sizeof(T)) throw std::bad_alloc();
  return static_cast<T*>(scratch(slot, n * sizeof(T)));
}

}  // namespace lk

namespace lk {

// Memory for large outputs handed to callers. A block given back returns to
// a bounded pool and is reused for the next output of its size, so a steady
// stream of same-sized outputs does not map (and page-fault) fresh memory on
// every call, as the system allocator's mmap threshold would make it.
void* output_alloc(size_t bytes);
void output_free(void* p, size_t bytes);
void output_pool_trim();  // give every pooled block back to the system
size_t output_pool_bytes();

}  // namespace lk
