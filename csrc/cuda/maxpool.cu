// Max-pooling: one thread per output element.
#include "cuda/maxpool.cuh"

#include <algorithm>

#include "cuda/pool_window.cuh"

namespace lk::cuda {

namespace {

constexpr int kPoolThreads = 256;

// Block (x, y): outputs [x * threads, +threads) of plane first_plane + y.
template <class T>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool2d_kernel(PoolShape s, const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                      long long first_plane) {
  const int o = static_cast<int>(blockIdx.x) * kPoolThreads + static_cast<int>(threadIdx.x);
  if (o >= s.P * s.Q) return;
  const long long plane = first_plane + blockIdx.y;
  const T* xp = x + plane * s.H * s.W;
  int index;
  const T best = window_max<T>(s, o / s.Q, o % s.Q, [&](int ih, int iw) { return xp[ih * s.W + iw]; }, index);
  const long long out = plane * s.P * s.Q + o;
  y[out] = best;
  if (indices) indices[out] = index;
}

template <class T>
void run_max_pool2d(const Pool2dDesc& d, const T* x, T* y, int64_t* indices, Stream stream) {
  check_pool(d);
  const int64_t planes = d.N * d.C;
  const int64_t PQ = d.P() * d.Q();
  const PoolShape s = pool_shape(d);
  for (int64_t p0 = 0; p0 < planes; p0 += kGridYZMax) {
    const dim3 grid(static_cast<unsigned>(ceil_div(PQ, kPoolThreads)),
                    static_cast<unsigned>(std::min(kGridYZMax, planes - p0)));
    launch(&max_pool2d_kernel<T>, grid, dim3(kPoolThreads), 0, stream, s, x, y, indices,
           static_cast<long long>(p0));
  }
}

}  // namespace

void check_pool(const Pool2dDesc& d) {
  require(d.N >= 0, "input: batch size must not be negative");
  require(d.C > 0 && d.H > 0 && d.W > 0, "input: expected non-zero channels, height and width");
  require(d.kh > 0 && d.kw > 0, "kernel_size: must be positive");
  require(d.stride_h > 0 && d.stride_w > 0, "stride: must be positive");
  require(d.dil_h > 0 && d.dil_w > 0, "dilation: must be positive");
  require(d.pad_h >= 0 && d.pad_w >= 0 && d.pad_h <= d.kh / 2 && d.pad_w <= d.kw / 2,
          "padding: must be non-negative and at most half of kernel_size");
  require(d.H + 2 * d.pad_h >= d.dil_h * (d.kh - 1) + 1 && d.W + 2 * d.pad_w >= d.dil_w * (d.kw - 1) + 1 &&
              d.P() >= 1 && d.Q() >= 1,
          "input: output size is too small for this kernel_size, padding and dilation");
  require(d.H * d.W <= kInt32Max && d.P() * d.Q() <= kInt32Max &&
              d.H + 2 * d.pad_h < (int64_t{1} << 30) && d.W + 2 * d.pad_w < (int64_t{1} << 30) &&
              (d.P() - 1) * d.stride_h < (int64_t{1} << 30) && (d.Q() - 1) * d.stride_w < (int64_t{1} << 30) &&
              (d.kh - 1) * d.dil_h < (int64_t{1} << 30) && (d.kw - 1) * d.dil_w < (int64_t{1} << 30),
          "input: too large for the GPU kernels' 32-bit indexing");
}

void max_pool2d(const Pool2dDesc& d, const float* x, float* y, int64_t* indices, Stream stream) {
  run_max_pool2d(d, x, y, indices, stream);
}

void max_pool2d(const Pool2dDesc& d, const double* x, double* y, int64_t* indices, Stream stream) {
  run_max_pool2d(d, x, y, indices, stream);
}

}  // namespace lk::cuda
