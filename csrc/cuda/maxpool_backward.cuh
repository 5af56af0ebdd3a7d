// Gradient of max_pool2d from its indices (int64, flattened per H*W plane,
// as max_pool2d returns them): each output's gradient is added to the input
// element its window took the maximum from. Overlapping windows (stride
// below kernel) can pick the same element, so the adds are atomic.
#pragma once
#include <cstdint>

#include "cuda/stream.h"

namespace lk::cuda {

// grad_output, indices: planes x PQ; grad_input: planes x HW (written in
// full: zeros, then the adds). An index outside [0, HW) is skipped, never
// written through (reporting it would need a synchronisation).
void max_pool2d_backward(const float* grad_output, const int64_t* indices, float* grad_input, int64_t planes,
                         int64_t HW, int64_t PQ, Stream stream);
void max_pool2d_backward(const double* grad_output, const int64_t* indices, double* grad_input, int64_t planes,
                         int64_t HW, int64_t PQ, Stream stream);

}  // namespace lk::cuda
