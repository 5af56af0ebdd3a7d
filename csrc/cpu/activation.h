// Element-wise and row-wise activations on contiguous buffers.
#pragma once
#include <cstdint>

namespace lk::cpu {

// y = max(x, 0), NaN kept. y may equal x.
template <class T>
void relu(const T* x, T* y, int64_t n);

// Softmax (or log-softmax) along the middle axis of an outer x dim x inner
// contiguous array; y may equal x.
template <class T>
void softmax(const T* x, T* y, int64_t outer, int64_t dim, int64_t inner, bool log);

}  // namespace lk::cpu
