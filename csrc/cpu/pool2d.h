// 2-D max-pooling with torch's semantics: NaN propagates, the first index
// wins on ties, indices are flattened per H*W plane.
#pragma once
#include <cstdint>

#include "core/descriptors.h"
#include "core/tensor.h"

namespace lk::cpu {

void validate(const Pool2dDesc& d);

// x: N x C x H x W, any strides; y (and indices, if given): N x C x P x Q, contiguous.
template <class T>
void max_pool2d(const Pool2dDesc& d, const TensorView& x, T* y, int64_t* indices);

}  // namespace lk::cpu
