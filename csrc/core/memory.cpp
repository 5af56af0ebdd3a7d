#include "core/memory.h"

namespace lk {

namespace {
constexpr int kSlots = 4;
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
