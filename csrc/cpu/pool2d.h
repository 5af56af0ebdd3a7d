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

// Output rows [p0, p1) of one plane: x points at input row r0 (row ih at
// x + (ih - r0) * sh; only rows the windows need are read), out and idx
// (optional) at output row p0, rows Q apart.
template <class T>
void max_pool_rows(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                   T* out, int64_t* idx);

}  // namespace lk::cpu
