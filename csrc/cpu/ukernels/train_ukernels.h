// Element-wise training kernels, one table per instruction-set level (see
// train.inc), picked at run time like the GEMM microkernels.
#pragma once
#include <cstdint>

#include "core/cpu_features.h"

namespace lk::cpu {

// Adam's per-step constants, in the parameter's precision.
template <class T>
struct AdamConsts {
  T weight_decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, neg_step_size;
};

template <class T>
using AdamUkernelFn = void (*)(int64_t n, T* param, const T* grad, T* exp_avg, T* exp_avg_sq,
                               const AdamConsts<T>& c);
template <class T>
using ReluBackwardUkernelFn = void (*)(int64_t n, const T* grad, const T* output, T* grad_input);

struct TrainUkernelTable {
  AdamUkernelFn<float> f32_adam;
  AdamUkernelFn<double> f64_adam;
  ReluBackwardUkernelFn<float> f32_relu_backward;
  ReluBackwardUkernelFn<double> f64_relu_backward;

  template <class T> AdamUkernelFn<T> adam() const;
  template <class T> ReluBackwardUkernelFn<T> relu_backward() const;
};

template <> inline AdamUkernelFn<float> TrainUkernelTable::adam<float>() const { return f32_adam; }
template <> inline AdamUkernelFn<double> TrainUkernelTable::adam<double>() const { return f64_adam; }
template <> inline ReluBackwardUkernelFn<float> TrainUkernelTable::relu_backward<float>() const {
  return f32_relu_backward;
}
template <> inline ReluBackwardUkernelFn<double> TrainUkernelTable::relu_backward<double>() const {
  return f64_relu_backward;
}

// The table of the active level.
const TrainUkernelTable& train_ukernels();

}  // namespace lk::cpu
