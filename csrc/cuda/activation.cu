// ReLU and softmax kernels.
#include "cuda/activation.cuh"

#include <algorithm>

#include "cuda/common.cuh"

namespace lk::cuda {

namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) relu_kernel(const T* x, T* y, long long n) {
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (e < n) y[e] = dev::relu(x[e]);
}

// Line l (of outer * inner) starts at (l / inner) * dim * inner + l % inner
// and steps by inner.
__device__ __forceinline__ long long line_start(long long line, long long dim, long long inner) {
  return line / inner * dim * inner + line % inner;
}

// The three passes over one line: maximum, sum of exponentials, output
// (y may be x: each element is read for the last time before it is written).
// A NaN never wins the maximum but turns the sum, and so the whole line,
// into NaN, as in the CPU library; a line of -inf gives NaN too, as in torch.
template <class T>
__global__ void __launch_bounds__(kThreads)
    softmax_block_kernel(const T* x, T* y, long long dim, long long inner, bool log,
                         long long first_line) {
  using Partials = SharedArray<T, kThreads>;
  LK_SHARED(Partials, buf);
  const int t = static_cast<int>(threadIdx.x);
  const long long start = line_start(first_line + blockIdx.x, dim, inner);
  const T* xl = x + start;
  T* yl = y + start;

  T mx = dev::neg_inf<T>();
  for (long long k = t; k < dim; k += kThreads) {
    const T v = xl[k * inner];
    mx = v > mx ? v : mx;
  }
  mx = block_reduce<kThreads>(mx, buf, [](T a, T b) { return a > b ? a : b; });
  T sum = T(0);
  for (long long k = t; k < dim; k += kThreads) sum += dev::exp(xl[k * inner] - mx);
  sum = block_reduce<kThreads>(sum, buf, [](T a, T b) { return a + b; });
  if (log) {
    const T lse = dev::log(sum);
    for (long long k = t; k < dim; k += kThreads) yl[k * inner] = (xl[k * inner] - mx) - lse;
  } else {
    const T inv = T(1) / sum;
    for (long long k = t; k < dim; k += kThreads) yl[k * inner] = dev::exp(xl[k * inner] - mx) * inv;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    softmax_thread_kernel(const T* x, T* y, long long lines, long long dim,
                          long long inner, bool log) {
  const long long line = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (line >= lines) return;
  const long long start = line_start(line, dim, inner);
  const T* xl = x + start;
  T* yl = y + start;
  T mx = dev::neg_inf<T>();
  for (long long k = 0; k < dim; ++k) {
    const T v = xl[k * inner];
    mx = v > mx ? v : mx;
  }
  T sum = T(0);
  for (long long k = 0; k < dim; ++k) sum += dev::exp(xl[k * inner] - mx);
  if (log) {
    const T lse = dev::log(sum);
    for (long long k = 0; k < dim; ++k) yl[k * inner] = (xl[k * inner] - mx) - lse;
  } else {
    const T inv = T(1) / sum;
    for (long long k = 0; k < dim; ++k) yl[k * inner] = dev::exp(xl[k * inner] - mx) * inv;
  }
}

template <class T>
void run_relu(const T* x, T* y, int64_t n, Stream stream) {
  require(n >= 0, "relu: size must not be negative");
  if (n == 0) return;
  require(ceil_div(n, kThreads) <= kInt32Max, "input: too large for one GPU grid");
  launch(&relu_kernel<T>, dim3(static_cast<unsigned>(ceil_div(n, kThreads))), dim3(kThreads), 0, stream, x, y,
         static_cast<long long>(n));
}

template <class T>
void run_softmax(const T* x, T* y, int64_t outer, int64_t dim, int64_t inner, bool log, Stream stream,
                 SoftmaxKernel kernel) {
  require(outer >= 0 && dim >= 0 && inner >= 0, "softmax: sizes must not be negative");
  if (outer == 0 || dim == 0 || inner == 0) return;
  if (kernel == SoftmaxKernel::automatic) kernel = softmax_kernel_for(outer, dim, inner);
  const int64_t lines = outer * inner;
  if (kernel == SoftmaxKernel::thread_per_line) {
    require(ceil_div(lines, kThreads) <= kInt32Max, "input: too large for one GPU grid");
    launch(&softmax_thread_kernel<T>, dim3(static_cast<unsigned>(ceil_div(lines, kThreads))), dim3(kThreads), 0,
           stream, x, y, static_cast<long long>(lines), static_cast<long long>(dim), static_cast<long long>(inner),
           log);
    return;
  }
  for (int64_t l0 = 0; l0 < lines; l0 += kInt32Max) {
    const dim3 grid(static_cast<unsigned>(std::min(kInt32Max, lines - l0)));
    launch(&softmax_block_kernel<T>, grid, dim3(kThreads), 0, stream, x, y, static_cast<long long>(dim),
           static_cast<long long>(inner), log, static_cast<long long>(l0));
  }
}

}  // namespace

SoftmaxKernel softmax_kernel_for(int64_t /*outer*/, int64_t dim, int64_t inner) {
  // A contiguous line long enough to keep a block's threads busy.
  return inner == 1 && dim >= 64 ? SoftmaxKernel::block_per_line : SoftmaxKernel::thread_per_line;
}

void relu(const float* x, float* y, int64_t n, Stream stream) { run_relu(x, y, n, stream); }
void relu(const double* x, double* y, int64_t n, Stream stream) { run_relu(x, y, n, stream); }

void softmax(const float* x, float* y, int64_t outer, int64_t dim, int64_t inner, bool log, Stream stream,
             SoftmaxKernel kernel) {
  run_softmax(x, y, outer, dim, inner, log, stream, kernel);
}

void softmax(const double* x, double* y, int64_t outer, int64_t dim, int64_t inner, bool log, Stream stream,
             SoftmaxKernel kernel) {
  run_softmax(x, y, outer, dim, inner, log, stream, kernel);
}

}  // namespace lk::cuda
