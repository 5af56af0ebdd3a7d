// Element-wise ReLU, and softmax / log-softmax along one dimension of an
// array seen as outer x dim x inner (contiguous), computed stably: the
// line's maximum is subtracted before exponentiating.
#pragma once
#include <cstdint>

#include "cuda/stream.h"

namespace lk::cuda {

enum class SoftmaxKernel {
  automatic,
  block_per_line,   // a block reduces each line: long contiguous lines (inner == 1)
  thread_per_line,  // a thread walks each line: neighbouring threads read neighbouring lines (inner > 1)
};

SoftmaxKernel softmax_kernel_for(int64_t outer, int64_t dim, int64_t inner);

// x, y: n (or outer * dim * inner) elements of contiguous device memory; y may be x.
void relu(const float* x, float* y, int64_t n, Stream stream);
void relu(const double* x, double* y, int64_t n, Stream stream);

void softmax(const float* x, float* y, int64_t outer, int64_t dim, int64_t inner, bool log, Stream stream,
             SoftmaxKernel kernel = SoftmaxKernel::automatic);
void softmax(const double* x, double* y, int64_t outer, int64_t dim, int64_t inner, bool log, Stream stream,
             SoftmaxKernel kernel = SoftmaxKernel::automatic);

}  // namespace lk::cuda
