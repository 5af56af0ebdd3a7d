// The device side of a launch, as the bindings need it: which device a
// pointer lives on, making a device current for a call, its properties, and
// ordering one stream after another. Implemented by device.cu against the
// CUDA runtime, and by emu_runtime.cpp for the emulator (a table of
// pretend devices over host memory), so the binding code is the same.
#pragma once
#include <cstdint>

#include "cuda/stream.h"

namespace lk::cuda {

int device_count();
int current_device();

// The device that owns `p` (device or managed memory); throws
// std::invalid_argument naming `what` for host memory or an invalid pointer.
int pointer_device(const void* p, const char* what);

// Multiprocessors of `device` and its compute capability (major * 10 +
// minor): the GPU plans depend on both.
int sm_count(int device);
int compute_capability(int device);

// Work enqueued on `consumer` from now on waits for what is already
// enqueued on `producer` (an event, no host synchronisation). Stream
// handles follow the CUDA array interface: 1 is the legacy default stream,
// 2 the per-thread default stream.
void stream_wait(int device, Stream consumer, Stream producer);

// Makes `device` current for the guard's lifetime.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace lk::cuda
