// Plain views of caller-owned memory. Strides are in elements, not bytes,
// and may be negative or zero: kernels never assume contiguity unless a plan
// checked for it.
#pragma once
#include <cstdint>

namespace lk {

enum class DType { f32, f64 };

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }

inline const char* dtype_name(DType t) { return t == DType::f32 ? "float32" : "float64"; }

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  template <class T> T* ptr() const { return static_cast<T*>(data); }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
};

}  // namespace lk
