// A CUDA execution model on the CPU, so the kernels' own source runs in CI
// without a GPU. Plain C++ only: nvcc never sees this file.
//
// Each thread of a block is a fiber with its own small stack. A block runs
// its fibers in turn on one OS thread: a fiber runs until it reaches
// __syncthreads or returns, and the block resumes them all only when every
// one of them has arrived at the same barrier. That makes __syncthreads a
// true barrier (a missing one lets a fiber read a tile its neighbours have
// not written yet, and the results go wrong), and a barrier that some
// threads skip, or one they reach from different places, is reported as an
// error instead of hanging or passing by luck.
//
// Blocks run one after another, spread over a few OS threads. Shared memory
// is a per-block arena filled with NaN bytes before each block, so a kernel
// that reads shared memory it did not write this block sees garbage.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace lk::emu {

// A kernel's misuse of the execution model: barrier divergence, shared
// memory out of bounds, an invalid launch configuration.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Largest shared memory a block may use without an opt-in on the device.
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr unsigned kMaxBlockThreads = 1024;

// OS threads that run blocks (1 = all on the caller's thread). Defaults to
// the number of cores, or LK_EMU_THREADS.
void set_threads(int n);
int threads();

namespace detail {

struct Fiber;
struct Worker;

// What a kernel running on this OS thread sees.
struct ThreadState {
  Worker* worker = nullptr;
  Fiber* fiber = nullptr;
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim, grid_dim;
};
extern constinit thread_local ThreadState t_state;

// The kernel call with its arguments, run once per fiber.
struct KernelCall {
  virtual void run() const = 0;

 protected:
  ~KernelCall() = default;
};

template <class... P>
struct BoundKernel final : KernelCall {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
  template <class... A>
  explicit BoundKernel(void (*k)(P...), A&&... a) : kernel(k), args(std::forward<A>(a)...) {}
  // Each thread gets its own copy of the parameters, as on the device.
  void run() const override { std::apply(kernel, args); }
};

void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const KernelCall& call);

void* shared_alloc(size_t bytes, size_t align);
void* dynamic_shared(size_t* bytes);
[[noreturn]] void shared_out_of_bounds(long long index, long long size);

}  // namespace detail

// Runs kernel<<<grid, block, dynamic_shared_bytes>>>(args...) to completion.
// Throws KernelError for a misuse of the execution model, or whatever the
// kernel threw, from the first block that failed.
template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  const detail::BoundKernel<P...> call(kernel, std::forward<A>(args)...);
  detail::run_grid(grid, block, dynamic_shared_bytes, call);
}

// __syncthreads(): suspends the calling fiber until every thread of its block
// has arrived at the same barrier.
void sync_threads(const char* file, int line);

// One object of type T in the block's shared memory: every thread that
// declares it gets the same object, as with __shared__.
template <class T>
T& shared_object() {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "shared memory holds trivial types only");
  return *static_cast<T*>(detail::shared_alloc(sizeof(T), alignof(T)));
}

inline const uint3& thread_idx() { return detail::t_state.thread_idx; }
inline const uint3& block_idx() { return detail::t_state.block_idx; }
inline const dim3& block_dim() { return detail::t_state.block_dim; }
inline const dim3& grid_dim() { return detail::t_state.grid_dim; }

}  // namespace lk::emu
