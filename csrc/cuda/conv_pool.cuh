// conv2d -> bias -> activation -> max_pool2d in one kernel: each block
// computes the convolution outputs under a tile of pooled outputs in shared
// memory and writes only the pooled values; the full-resolution convolution
// output never reaches global memory.
#pragma once
#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

// Pooled outputs per block (rows x columns), or {0, 0} when even one pooling
// window reads more convolution outputs than a block keeps in shared memory;
// such a call runs unfused (convolution into a workspace, then max_pool2d).
struct ConvPoolTile {
  int rows = 0, cols = 0;
};
// The tile depends on the device through its multiprocessors: the cost
// model counts waves of resident blocks (docs/gpu-design.md).
constexpr int kDefaultSmCount = 132;  // an H100
ConvPoolTile conv_pool_tile(const Conv2dDesc& conv, const Pool2dDesc& pool, bool f64, int sm_count = kDefaultSmCount);

// pool: kernel, stride, padding, dilation, ceil_mode; its N, C, H, W are
// those of the convolution's output. x, w, bias as for conv2d; y is
// N x K x P' x Q' (pooled), contiguous device memory. `tile` is a plan's
// conv_pool_tile for this call (null: chosen here for kDefaultSmCount).
void conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool, const float* x, const float* w,
                       const float* bias, float* y, Stream stream, const ConvPoolTile* tile = nullptr);
void conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool, const double* x, const double* w,
                       const double* bias, double* y, Stream stream, const ConvPoolTile* tile = nullptr);

}  // namespace lk::cuda
