// One kernel source for two compilers: nvcc, and a plain C++20 compiler
// that runs the kernels under the emulator (cuda/emulator.h) in CI.
//
// Kernels use the CUDA spellings (__global__, threadIdx, __syncthreads, ...)
// plus three things of ours that have a meaning in both builds:
//   LK_SHARED(Type, name)   a __shared__ object (emulation: the block's
//                           arena, poisoned before each block);
//   SharedArray<T, N>       a fixed array whose indexing is bounds-checked
//                           under emulation and plain indexing under nvcc;
//   LK_HD                   a helper callable from host and device;
//   LK_UNROLL               unroll the next loop (both compilers' pragma).
#pragma once
#include <math.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define LK_HD __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#define LK_SHARED(Type, name) __shared__ Type name
#define LK_SHARED_BOUNDS(i, n) ((void)0)

#else  // emulation

#include <atomic>

#include "cuda/emulator.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Function-scope statics, one per OS thread: the emulator runs one block at
// a time per OS thread, so all threads of a block share them. Our kernels
// use LK_SHARED instead, which also poisons and bounds the storage.
#define __shared__ static thread_local

#define threadIdx (::lk::emu::thread_idx())
#define blockIdx (::lk::emu::block_idx())
#define blockDim (::lk::emu::block_dim())
#define gridDim (::lk::emu::grid_dim())
#define __syncthreads() ::lk::emu::sync_threads(__FILE__, __LINE__)

#define LK_HD inline
#define LK_UNROLL _Pragma("GCC unroll 16")
#define LK_SHARED(Type, name) Type& name = ::lk::emu::shared_object<Type>()
#define LK_SHARED_BOUNDS(i, n)                                                 \
  do {                                                                         \
    if (static_cast<unsigned long long>(i) >= static_cast<unsigned long long>(n)) \
      ::lk::emu::detail::shared_out_of_bounds(i, n);                           \
  } while (0)

// The emulator runs blocks on several OS threads at once, so atomicAdd must
// be a real atomic read-modify-write (a compare-and-swap loop on the value;
// float and double have no fetch_add before C++20's atomic_ref). Fibers of
// one block switch only at barriers, never inside it.
template <class T>
inline T atomicAdd(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, old + value, std::memory_order_relaxed)) {
  }
  return old;
}

#endif

namespace lk::cuda {

template <class T, int N>
struct SharedArray {
  static_assert(N > 0, "empty array");
  T v[N];
  LK_HD T& operator[](int i) {
    LK_SHARED_BOUNDS(i, N);
    return v[i];
  }
  LK_HD const T& operator[](int i) const {
    LK_SHARED_BOUNDS(i, N);
    return v[i];
  }
};

// a[row][col], each index checked.
template <class T, int Rows, int Cols>
using SharedArray2 = SharedArray<SharedArray<T, Cols>, Rows>;

// Device math for float and double from one template: the global C
// functions exist under nvcc (device overloads) and in libm alike.
namespace dev {
LK_HD float exp(float x) { return ::expf(x); }
LK_HD double exp(double x) { return ::exp(x); }
LK_HD float log(float x) { return ::logf(x); }
LK_HD double log(double x) { return ::log(x); }
LK_HD float sqrt(float x) { return ::sqrtf(x); }
LK_HD double sqrt(double x) { return ::sqrt(x); }
template <class T>
LK_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}
template <class T>
LK_HD bool is_nan(T x) {
  return x != x;
}
// torch's max-pool rule: a NaN replaces anything, otherwise strictly greater.
template <class T>
LK_HD bool takes_max(T candidate, T best) {
  return candidate > best || candidate != candidate;
}
template <class T>
LK_HD T relu(T x) {
  // NaN < 0 is false, so NaN passes through as in torch.
  return x < T(0) ? T(0) : x;
}
LK_HD int min(int a, int b) { return a < b ? a : b; }
LK_HD int max(int a, int b) { return a > b ? a : b; }
}  // namespace dev

}  // namespace lk::cuda
