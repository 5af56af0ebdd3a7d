// Max-pool backward: a zero fill, then a thread per output that adds its
// gradient at its index with atomicAdd.
#include "cuda/maxpool_backward.cuh"

#include "cuda/common.cuh"

namespace lk::cuda {

namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) fill_zero_kernel(T* __restrict__ y, long long n) {
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (e < n) y[e] = T(0);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_backward_kernel(const T* __restrict__ go, const int64_t* __restrict__ indices, T* __restrict__ gi,
                               long long HW, long long PQ, long long total) {
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  const long long index = indices[e];
  if (index < 0 || index >= HW) return;
  atomicAdd(gi + e / PQ * HW + index, go[e]);
}

template <class T>
void run_max_pool2d_backward(const T* go, const int64_t* indices, T* gi, int64_t planes, int64_t HW, int64_t PQ,
                             Stream stream) {
  require(planes >= 0 && HW > 0 && PQ > 0, "input: expected a non-empty pooling plane");
  const int64_t n_in = planes * HW, n_out = planes * PQ;
  require(ceil_div(n_in, kThreads) <= kInt32Max && ceil_div(n_out, kThreads) <= kInt32Max,
          "input: too large for one GPU grid");
  if (planes == 0) return;
  launch(&fill_zero_kernel<T>, dim3(static_cast<unsigned>(ceil_div(n_in, kThreads))), dim3(kThreads), 0, stream, gi,
         static_cast<long long>(n_in));
  launch(&max_pool2d_backward_kernel<T>, dim3(static_cast<unsigned>(ceil_div(n_out, kThreads))), dim3(kThreads), 0,
         stream, go, indices, gi, static_cast<long long>(HW), static_cast<long long>(PQ),
         static_cast<long long>(n_out));
}

}  // namespace

void max_pool2d_backward(const float* grad_output, const int64_t* indices, float* grad_input, int64_t planes,
                         int64_t HW, int64_t PQ, Stream stream) {
  run_max_pool2d_backward(grad_output, indices, grad_input, planes, HW, PQ, stream);
}

void max_pool2d_backward(const double* grad_output, const int64_t* indices, double* grad_input, int64_t planes,
                         int64_t HW, int64_t PQ, Stream stream) {
  run_max_pool2d_backward(grad_output, indices, grad_input, planes, HW, PQ, stream);
}

}  // namespace lk::cuda
