// 2-D convolution on the GPU (torch.nn.functional.conv2d semantics, every
// argument: stride, asymmetric padding, dilation, groups) with the bias and
// activation of the descriptor fused into the store.
#pragma once
#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

enum class ConvKernel {
  automatic,
  implicit_gemm,  // block tiles of filters x output pixels, staged in shared memory
  direct,         // one thread per output element: for groups of few filters (depthwise)
};

// Throws std::invalid_argument, naming the argument, for a descriptor the
// kernels cannot run (including sizes beyond their 32-bit indexing).
void check_conv2d(const Conv2dDesc& d);

// The kernel `automatic` picks for a descriptor.
ConvKernel conv2d_kernel_for(const Conv2dDesc& d);

// x: N x C x H x W, w: K x C/groups x R x S, bias: K or null, y: N x K x P x Q;
// contiguous device memory. Launches on `stream` and returns.
void conv2d(const Conv2dDesc& d, const float* x, const float* w, const float* bias, float* y, Stream stream,
            ConvKernel kernel = ConvKernel::automatic);
void conv2d(const Conv2dDesc& d, const double* x, const double* w, const double* bias, double* y, Stream stream,
            ConvKernel kernel = ConvKernel::automatic);

}  // namespace lk::cuda
