// What the CUDA runtime sees. Compiled only when the build has CUDA; the
// kernels themselves live beside this file, one .cu/.cuh per op.
#pragma once
#include <string>
#include <vector>

namespace lk::cuda {

struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;
  int sm_count = 0;
  size_t memory_bytes = 0;
};

// Devices the runtime can use; empty when there is no GPU or no driver
// (never an error: the CPU path serves every call then).
std::vector<DeviceInfo> devices();
int runtime_version();

}  // namespace lk::cuda
