// NumPy arrays <-> core views. The Python layer has already normalised
// arguments; this only checks what the native code relies on.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "core/error.h"
#include "core/memory.h"
#include "core/tensor.h"

namespace lk::bindings {

namespace py = pybind11;

// The element type from the array's descriptor, without the reference
// counting and equivalence test of dtype().equal() (called on every call):
// native or little-endian byte order only, as that test would require.
inline bool has_type(const py::array& a, int type_num) {
  const auto* d = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
  return d->type_num == type_num && d->byteorder != '>';
}
inline bool is_f32(const py::array& a) { return has_type(a, py::detail::npy_api::NPY_FLOAT_); }
inline bool is_f64(const py::array& a) { return has_type(a, py::detail::npy_api::NPY_DOUBLE_); }

// An array the core may read, with its view. Misaligned data or strides that
// are not whole elements (possible with np.ndarray(buffer=..., strides=...))
// are copied once, so kernels may assume element-aligned access.
struct Input {
  py::array array;
  TensorView view;
};

inline Input input_view(py::array a, const char* name, int ndim) {
  LK_CHECK(a.ndim() == ndim, name, ": expected ", ndim, " dimensions, got ", a.ndim());
  LK_CHECK(ndim <= kMaxDims, name, ": too many dimensions");
  if (!is_f32(a) && !is_f64(a))
    throw py::type_error(cat(name, ": expected dtype float32 or float64, got ", py::str(a.dtype()).cast<std::string>()));
  const auto item = a.itemsize();
  bool ok = (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
  for (int i = 0; i < ndim && ok; ++i) ok = a.strides(i) % item == 0;
  if (!ok) a = py::array::ensure(a, py::array::c_style);
  Input in{a, {}};
  in.view.data = const_cast<void*>(a.data());
  in.view.dtype = is_f32(a) ? DType::f32 : DType::f64;
  in.view.ndim = ndim;
  for (int i = 0; i < ndim; ++i) {
    in.view.shape[i] = a.shape(i);
    in.view.strides[i] = a.strides(i) / item;
  }
  return in;
}

// The output: `out` when the caller gave one (checked), else a new array.
// Outputs from this size up come from the output pool (core/memory.h).
constexpr size_t kPooledOutputBytes = 256 * 1024;

template <class T, class Int = py::ssize_t>
py::array_t<T> new_array(const std::vector<Int>& shape) {
  size_t bytes = sizeof(T);
  for (auto s : shape) bytes *= static_cast<size_t>(s);
  if (bytes < kPooledOutputBytes && shape.size() <= kMaxDims) {
    // NumPy's constructor directly: array_t's copies the shape and computes
    // the strides in vectors of its own, a sizeable share of a small call.
    Py_intptr_t dims[kMaxDims];
    for (size_t i = 0; i < shape.size(); ++i) dims[i] = static_cast<Py_intptr_t>(shape[i]);
    auto& api = py::detail::npy_api::get();
    PyObject* a = api.PyArray_NewFromDescr_(api.PyArray_Type_, py::dtype::of<T>().release().ptr(),
                                            static_cast<int>(shape.size()), dims, nullptr, nullptr, 0, nullptr);
    if (a == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::array_t<T>>(a);
  }
  struct Block {
    void* p;
    size_t bytes;
    ~Block() { output_free(p, bytes); }
  };
  std::unique_ptr<Block> block(new Block{output_alloc(bytes), bytes});
  void* p = block->p;
  py::capsule owner(block.get(), [](void* b) { delete static_cast<Block*>(b); });
  block.release();  // the capsule owns it now
  return py::array_t<T>(shape, static_cast<T*>(p), owner);
}

template <class T, class Int = py::ssize_t>
py::array_t<T> output_array(const py::object& out, const std::vector<Int>& shape) {
  if (out.is_none()) return new_array<T>(shape);
  auto a = py::reinterpret_borrow<py::array>(out);
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(cat("out: expected dtype ", py::str(py::dtype::of<T>()).cast<std::string>(), ", got ",
                             py::str(a.dtype()).cast<std::string>()));
  LK_CHECK(a.writeable(), "out: array is read-only");
  LK_CHECK(static_cast<size_t>(a.ndim()) == shape.size(), "out: expected ", shape.size(), " dimensions");
  for (size_t i = 0; i < shape.size(); ++i)
    LK_CHECK(a.shape(i) == shape[i], "out: wrong shape at dimension ", i, ": expected ", shape[i], ", got ", a.shape(i));
  LK_CHECK((a.flags() & py::array::c_style) != 0, "out: must be C-contiguous");
  return py::reinterpret_borrow<py::array_t<T>>(out);
}

}  // namespace lk::bindings
