// What the kernel files share: the launch call, host-side checks, device
// workspaces and a block-wide reduction. Included by .cu files only.
#pragma once
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/portability.cuh"
#include "cuda/stream.h"

#if !defined(__CUDACC__)
#include <vector>
#endif

namespace lk::cuda {

// Kernels index with int32 (64-bit integer math costs registers and issue
// slots on the GPU); launchers split the work so that every index fits.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kGridYZMax = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Argument checks of the launchers: std::invalid_argument, as in the core.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

#if defined(__CUDACC__)
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
#endif

// kernel<<<grid, block, shared_bytes, stream>>>(args...), in either build.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, Stream stream, A&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<A>(args)...);
  check_cuda(cudaGetLastError(), "kernel launch");
#else
  (void)stream;
  ::lk::emu::launch(grid, block, shared_bytes, kernel, std::forward<A>(args)...);
#endif
}

// Device memory that lives for one launcher call, ordered on its stream.
template <class T>
class Workspace {
 public:
  Workspace(size_t count, Stream stream) : stream_(stream) {
#if defined(__CUDACC__)
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, count * sizeof(T), stream), "workspace");
    data_ = static_cast<T*>(p);
#else
    buffer_.resize(count);
    data_ = buffer_.data();
#endif
  }
  ~Workspace() {
#if defined(__CUDACC__)
    cudaFreeAsync(data_, stream_);
#endif
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  [[maybe_unused]] Stream stream_;
#if !defined(__CUDACC__)
  std::vector<T> buffer_;
#endif
};

// A block-wide reduction through shared memory; every thread of the block
// must call it (it holds barriers) and every thread gets the result.
template <int Threads, class T, class Op>
__device__ __forceinline__ T block_reduce(T v, SharedArray<T, Threads>& buf, Op op) {
  static_assert((Threads & (Threads - 1)) == 0, "power of two threads");
  const int t = static_cast<int>(threadIdx.x);
  buf[t] = v;
  __syncthreads();
  for (int half = Threads / 2; half > 0; half /= 2) {
    if (t < half) buf[t] = op(buf[t], buf[t + half]);
    __syncthreads();
  }
  const T result = buf[0];
  // The buffer is reused by the next reduction; nobody may overwrite it
  // before everyone has read the result.
  __syncthreads();
  return result;
}

}  // namespace lk::cuda
