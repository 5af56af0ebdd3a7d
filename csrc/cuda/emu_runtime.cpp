// The device runtime of cuda/runtime.h for the emulator: pretend devices
// over host memory. Kernels run on the CPU whatever the "device"; what the
// table changes is what the bindings see (device ids, multiprocessor counts
// for the GPU plans), so the device-dependent code is testable here.
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/emu_runtime.h"
#include "cuda/runtime.h"

namespace lk::cuda {

namespace {

std::mutex g_mutex;
std::vector<int> g_sm_counts{132};  // one device, shaped like an H100
thread_local int t_current = 0;

}  // namespace

void set_emulated_devices(const std::vector<int>& sm_counts) {
  if (sm_counts.empty()) throw std::invalid_argument("sm_counts: at least one device");
  for (int n : sm_counts)
    if (n < 1) throw std::invalid_argument("sm_counts: must be positive");
  std::lock_guard lock(g_mutex);
  g_sm_counts = sm_counts;
  t_current = 0;
}

int device_count() {
  std::lock_guard lock(g_mutex);
  return static_cast<int>(g_sm_counts.size());
}

int current_device() { return t_current; }

int pointer_device(const void* p, const char* what) {
  // Host memory has no device: it belongs to whichever is current.
  if (!p) throw std::invalid_argument(std::string(what) + ": null data pointer");
  return t_current;
}

int sm_count(int device) {
  std::lock_guard lock(g_mutex);
  if (device < 0 || device >= static_cast<int>(g_sm_counts.size()))
    throw std::invalid_argument("device: no emulated device " + std::to_string(device));
  return g_sm_counts[static_cast<size_t>(device)];
}

int compute_capability(int device) {
  sm_count(device);  // checks the device
  return 90;         // emulated devices are shaped like an H100
}

void stream_wait(int /*device*/, Stream /*consumer*/, Stream /*producer*/) {
  // One CPU thread runs every launch to completion: already ordered.
}

DeviceGuard::DeviceGuard(int device) : previous_(t_current) {
  if (device < 0 || device >= device_count())
    throw std::invalid_argument("device: no emulated device " + std::to_string(device));
  t_current = device;
  switched_ = true;
}

DeviceGuard::~DeviceGuard() { t_current = previous_; }

}  // namespace lk::cuda
