// Optimiser steps on device arrays.
#pragma once
#include <cstdint>

#include "cuda/stream.h"

namespace lk::cuda {

// One torch.optim.Adam step (L2 weight decay added to the gradient, not
// AdamW), in place on n contiguous elements of param, exp_avg and
// exp_avg_sq; grad is contiguous and read only. step counts from 1. The
// bias corrections are computed on the host in double, as the CPU step does,
// so both run the same per-element arithmetic.
struct AdamArgs {
  int64_t step;
  double lr, beta1, beta2, eps, weight_decay;
};
void adam_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n, const AdamArgs& a,
               Stream stream);
void adam_step(double* param, const double* grad, double* exp_avg, double* exp_avg_sq, int64_t n,
               const AdamArgs& a, Stream stream);

}  // namespace lk::cuda
