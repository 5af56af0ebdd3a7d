// Gradients of linear (y = x W^T + b) on the GPU, as torch's autograd
// computes them: grad_input = grad_y W, grad_weight = grad_y^T x,
// grad_bias = the column sums of grad_y.
#pragma once
#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

// grad_output: M x N, x: M x K, w: N x K; grad_input: M x K, grad_weight:
// N x K, grad_bias: N; each output may be null (not wanted). Contiguous
// device memory; d.act must be none (a fused ReLU's gradient is
// relu_backward's). Launches on `stream` and returns.
void linear_backward(const LinearDesc& d, const float* grad_output, const float* x, const float* w,
                     float* grad_input, float* grad_weight, float* grad_bias, Stream stream);
void linear_backward(const LinearDesc& d, const double* grad_output, const double* x, const double* w,
                     double* grad_input, double* grad_weight, double* grad_bias, Stream stream);

}  // namespace lk::cuda
