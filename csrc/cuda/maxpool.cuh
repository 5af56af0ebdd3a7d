// 2-D max-pooling on the GPU with torch.nn.functional.max_pool2d semantics:
// NaN propagates, the first maximum wins on ties, padding is never a
// candidate, indices are int64 and flattened per H*W plane.
#pragma once
#include <cstdint>

#include "core/descriptors.h"
#include "cuda/stream.h"

namespace lk::cuda {

void check_pool(const Pool2dDesc& d);

// x: N x C x H x W, y and indices (null for none): N x C x P x Q; contiguous
// device memory.
void max_pool2d(const Pool2dDesc& d, const float* x, float* y, int64_t* indices, Stream stream);
void max_pool2d(const Pool2dDesc& d, const double* x, double* y, int64_t* indices, Stream stream);

}  // namespace lk::cuda
