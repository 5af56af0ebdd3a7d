// Gradients of conv2d on the GPU (every argument: stride, asymmetric
// padding, dilation, groups), as torch's autograd computes them.
#pragma once
#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

// Throws std::invalid_argument, naming the argument, for a descriptor the
// backward kernels cannot run.
void check_conv2d_backward(const Conv2dDesc& d);

// grad_output: N x K x P x Q, x: N x C x H x W, w: K x C/groups x R x S;
// grad_input: N x C x H x W, grad_weight: K x C/groups x R x S, grad_bias:
// K; each output may be null (not wanted). Contiguous device memory; d.act
// must be none and d.has_bias is ignored. Launches on `stream` and returns.
void conv2d_backward(const Conv2dDesc& d, const float* grad_output, const float* x, const float* w,
                     float* grad_input, float* grad_weight, float* grad_bias, Stream stream);
void conv2d_backward(const Conv2dDesc& d, const double* grad_output, const double* x, const double* w,
                     double* grad_input, double* grad_weight, double* grad_bias, Stream stream);

}  // namespace lk::cuda
