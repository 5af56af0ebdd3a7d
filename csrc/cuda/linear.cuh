// Fully-connected layer on the GPU: y = act(x W^T + bias), as
// torch.nn.functional.linear with the descriptor's activation fused.
#pragma once
#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

enum class LinearKernel {
  automatic,
  gemm,  // block tiles of rows x features staged in shared memory
  dot,   // one block per output feature and a few rows: for a handful of rows or features
};

LinearKernel linear_kernel_for(const LinearDesc& d);

// x: M x K, w: N x K, bias: N or null, y: M x N; contiguous device memory.
void linear(const LinearDesc& d, const float* x, const float* w, const float* bias, float* y, Stream stream,
            LinearKernel kernel = LinearKernel::automatic);
void linear(const LinearDesc& d, const double* x, const double* w, const double* bias, double* y, Stream stream,
            LinearKernel kernel = LinearKernel::automatic);

}  // namespace lk::cuda
