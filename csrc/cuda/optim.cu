// Adam: one thread per element, each reading and writing its own elements
// once (coalesced); the per-step constants arrive by value.
#include "cuda/optim.cuh"

#include <cmath>

#include "cuda/common.cuh"

namespace lk::cuda {

namespace {

constexpr int kThreads = 256;

template <class T>
struct AdamConsts {
  T weight_decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, neg_step_size;
};

// The CPU ukernel's arithmetic (csrc/cpu/ukernels/train.inc), element by element.
template <class T>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ exp_avg,
                T* __restrict__ exp_avg_sq, long long n, AdamConsts<T> c) {
  const long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const T p = param[i];
  const T g = c.weight_decay != T(0) ? grad[i] + c.weight_decay * p : grad[i];
  const T m = exp_avg[i] + c.one_minus_beta1 * (g - exp_avg[i]);
  const T v = c.beta2 * exp_avg_sq[i] + c.one_minus_beta2 * g * g;
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  param[i] = p + c.neg_step_size * m / (dev::sqrt(v) * c.inv_bc2_sqrt + c.eps);
}

template <class T>
void run_adam(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, int64_t n, const AdamArgs& a, Stream stream) {
  require(n >= 0, "adam_step: size must not be negative");
  require(a.step >= 1, "step: must be at least 1");
  if (n == 0) return;
  require(ceil_div(n, kThreads) <= kInt32Max, "param: too large for one GPU grid");
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  const AdamConsts<T> c{static_cast<T>(a.weight_decay), static_cast<T>(1.0 - a.beta1), static_cast<T>(a.beta2),
                        static_cast<T>(1.0 - a.beta2),  static_cast<T>(1.0 / std::sqrt(bc2)),
                        static_cast<T>(a.eps),          static_cast<T>(-a.lr / bc1)};
  launch(&adam_kernel<T>, dim3(static_cast<unsigned>(ceil_div(n, kThreads))), dim3(kThreads), 0, stream, param,
         grad, exp_avg, exp_avg_sq, static_cast<long long>(n), c);
}

}  // namespace

void adam_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n, const AdamArgs& a,
               Stream stream) {
  run_adam(param, grad, exp_avg, exp_avg_sq, n, a, stream);
}
void adam_step(double* param, const double* grad, double* exp_avg, double* exp_avg_sq, int64_t n,
               const AdamArgs& a, Stream stream) {
  run_adam(param, grad, exp_avg, exp_avg_sq, n, a, stream);
}

}  // namespace lk::cuda
