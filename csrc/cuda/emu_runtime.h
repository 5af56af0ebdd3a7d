// Emulator only: the table of pretend devices (cuda/runtime.h).
#pragma once
#include <vector>

namespace lk::cuda {

// One device per entry, with that many multiprocessors; device 0 current.
void set_emulated_devices(const std::vector<int>& sm_counts);

}  // namespace lk::cuda
