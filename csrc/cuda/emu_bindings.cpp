// lepton_kernels._cuda_emu: the CUDA kernels' launchers, compiled as plain
// C++ and run under the emulator, on NumPy arrays. For the tests: it is how
// CI executes the kernels' logic without a GPU.
//
// Each array is copied into a buffer with guard zones on both sides, the
// stand-in for device memory: inputs are fenced with NaN (a kernel that
// reads past an input computes NaN), outputs start as NaN (an element the
// kernel never writes stays NaN) and are fenced with a bit pattern that is
// checked after the launch (a kernel that writes past its output fails).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <string>
#include <vector>

#include "bindings/cuda_ops.h"
#include "core/descriptors.h"
#include "core/plan_cache.h"
#include "cuda/activation.cuh"
#include "cuda/activation_backward.cuh"
#include "cuda/conv2d_backward.cuh"
#include "cuda/emu_runtime.h"
#include "cuda/linear_backward.cuh"
#include "cuda/maxpool_backward.cuh"
#include "cuda/conv2d.cuh"
#include "cuda/conv_pool.cuh"
#include "cuda/emulator.h"
#include "cuda/gemm_tile.cuh"
#include "cuda/linear.cuh"
#include "cuda/maxpool.cuh"
#include "cuda/portability.cuh"

namespace py = pybind11;

namespace {

using lk::cuda::Stream;

constexpr size_t kGuard = 64;  // elements on each side of a buffer

template <class T>
T guard_pattern() {
  if constexpr (std::is_same_v<T, int64_t>) {
    return int64_t{0x5EEDFACE0DDBA115};
  } else {
    return std::numeric_limits<T>::quiet_NaN();
  }
}

template <class T>
class Buffer {
 public:
  Buffer(size_t n, T fill, T guard) : n_(n), data_(n + 2 * kGuard, guard), guard_(guard) {
    std::fill(data_.begin() + kGuard, data_.begin() + kGuard + n, fill);
  }
  T* get() { return data_.data() + kGuard; }
  size_t size() const { return n_; }

  void check_guards(const char* what) const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (!same_bits(data_[i]) || !same_bits(data_[kGuard + n_ + i]))
        throw std::runtime_error(std::string("kernel wrote outside ") + what);
    }
  }

 private:
  bool same_bits(const T& v) const { return std::memcmp(&v, &guard_, sizeof(T)) == 0; }
  size_t n_;
  std::vector<T> data_;
  T guard_;
};

template <class T>
Buffer<T> input_buffer(const py::array& a) {
  auto c = py::array_t<T, py::array::c_style>::ensure(a);
  if (!c) throw py::type_error("expected a float array");
  Buffer<T> b(static_cast<size_t>(c.size()), T(0), std::numeric_limits<T>::quiet_NaN());
  if (c.size()) std::memcpy(b.get(), c.data(), static_cast<size_t>(c.size()) * sizeof(T));
  return b;
}

template <class T>
Buffer<T> output_buffer(int64_t n) {
  T poison;
  if constexpr (std::is_same_v<T, int64_t>) {
    poison = -7;  // not an index
  } else {
    poison = std::numeric_limits<T>::quiet_NaN();
  }
  return Buffer<T>(static_cast<size_t>(n), poison, guard_pattern<T>());
}

template <class T>
py::array_t<T> to_numpy(Buffer<T>& b, const std::vector<py::ssize_t>& shape, const char* what) {
  b.check_guards(what);
  py::array_t<T> out(shape);
  if (b.size()) std::memcpy(out.mutable_data(), b.get(), b.size() * sizeof(T));
  return out;
}

bool is_f64(const py::array& a) {
  if (a.dtype().equal(py::dtype::of<double>())) return true;
  if (a.dtype().equal(py::dtype::of<float>())) return false;
  throw py::type_error("expected float32 or float64 arrays");
}

void same_dtype(const py::array& a, const py::array& b, const char* name) {
  if (!a.dtype().equal(b.dtype())) throw py::type_error(std::string(name) + ": dtype differs from the input's");
}

void expect_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions");
}

using Pair = std::pair<int64_t, int64_t>;
using Quad = std::tuple<int64_t, int64_t, int64_t, int64_t>;

lk::Conv2dDesc conv_desc(const py::array& x, const py::array& w, const py::object& bias, Pair stride, Quad padding,
                         Pair dilation, int64_t groups, bool relu) {
  expect_ndim(x, 4, "input");
  expect_ndim(w, 4, "weight");
  same_dtype(x, w, "weight");
  lk::Conv2dDesc d;
  d.dtype = is_f64(x) ? lk::DType::f64 : lk::DType::f32;
  d.N = x.shape(0), d.C = x.shape(1), d.H = x.shape(2), d.W = x.shape(3);
  d.K = w.shape(0), d.R = w.shape(2), d.S = w.shape(3);
  d.groups = groups;
  if (groups < 1 || w.shape(1) * groups != d.C)
    throw py::value_error("groups: weight's in_channels times groups must equal the input's channels");
  std::tie(d.stride_h, d.stride_w) = stride;
  std::tie(d.pad_top, d.pad_bottom, d.pad_left, d.pad_right) = padding;
  std::tie(d.dil_h, d.dil_w) = dilation;
  d.has_bias = !bias.is_none();
  if (d.has_bias) {
    auto b = py::reinterpret_borrow<py::array>(bias);
    same_dtype(x, b, "bias");
    if (b.ndim() != 1 || b.shape(0) != d.K) throw py::value_error("bias: expected one value per filter");
  }
  d.act = relu ? lk::Activation::relu : lk::Activation::none;
  return d;
}

lk::Pool2dDesc pool_desc(Pair kernel, Pair stride, Pair padding, Pair dilation, bool ceil_mode) {
  lk::Pool2dDesc d;
  std::tie(d.kh, d.kw) = kernel;
  std::tie(d.stride_h, d.stride_w) = stride;
  std::tie(d.pad_h, d.pad_w) = padding;
  std::tie(d.dil_h, d.dil_w) = dilation;
  d.ceil_mode = ceil_mode;
  return d;
}

lk::cuda::ConvKernel conv_kernel(const std::string& name) {
  if (name == "auto") return lk::cuda::ConvKernel::automatic;
  if (name == "implicit_gemm") return lk::cuda::ConvKernel::implicit_gemm;
  if (name == "direct") return lk::cuda::ConvKernel::direct;
  throw py::value_error("kernel: expected 'auto', 'implicit_gemm' or 'direct'");
}

lk::cuda::LinearKernel linear_kernel(const std::string& name) {
  if (name == "auto") return lk::cuda::LinearKernel::automatic;
  if (name == "gemm") return lk::cuda::LinearKernel::gemm;
  if (name == "dot") return lk::cuda::LinearKernel::dot;
  throw py::value_error("kernel: expected 'auto', 'gemm' or 'dot'");
}

lk::cuda::SoftmaxKernel softmax_kernel(const std::string& name) {
  if (name == "auto") return lk::cuda::SoftmaxKernel::automatic;
  if (name == "block_per_line") return lk::cuda::SoftmaxKernel::block_per_line;
  if (name == "thread_per_line") return lk::cuda::SoftmaxKernel::thread_per_line;
  throw py::value_error("kernel: expected 'auto', 'block_per_line' or 'thread_per_line'");
}

template <class T>
py::array conv2d_impl(const lk::Conv2dDesc& d, const py::array& x, const py::array& w, const py::object& bias,
                      lk::cuda::ConvKernel kernel) {
  auto xb = input_buffer<T>(x), wb = input_buffer<T>(w);
  Buffer<T> bb = bias.is_none() ? Buffer<T>(0, T(0), T(0)) : input_buffer<T>(bias);
  // Shapes are only known to be valid after the launcher's checks; an
  // invalid descriptor must raise, not allocate a nonsense size.
  lk::cuda::check_conv2d(d);
  auto yb = output_buffer<T>(d.N * d.K * d.P() * d.Q());
  {
    py::gil_scoped_release release;
    lk::cuda::conv2d(d, xb.get(), wb.get(), bias.is_none() ? nullptr : bb.get(), yb.get(), Stream{}, kernel);
  }
  return to_numpy(yb, {d.N, d.K, d.P(), d.Q()}, "the convolution output");
}

template <class T>
py::tuple max_pool2d_impl(lk::Pool2dDesc d, const py::array& x, bool return_indices) {
  lk::cuda::check_pool(d);
  auto xb = input_buffer<T>(x);
  const int64_t n = d.N * d.C * d.P() * d.Q();
  auto yb = output_buffer<T>(n);
  auto ib = output_buffer<int64_t>(return_indices ? n : 0);
  {
    py::gil_scoped_release release;
    lk::cuda::max_pool2d(d, xb.get(), yb.get(), return_indices ? ib.get() : nullptr, Stream{});
  }
  const std::vector<py::ssize_t> shape{d.N, d.C, d.P(), d.Q()};
  auto y = to_numpy(yb, shape, "the pooled output");
  if (!return_indices) return py::make_tuple(y, py::none());
  return py::make_tuple(y, to_numpy(ib, shape, "the indices"));
}

template <class T>
py::array conv_pool_impl(const lk::Conv2dDesc& c, const lk::Pool2dDesc& p, const py::array& x, const py::array& w,
                         const py::object& bias) {
  // The pooled size, from a pool descriptor over the convolution's output.
  lk::cuda::check_conv2d(c);
  lk::Pool2dDesc over = p;
  over.N = c.N, over.C = c.K, over.H = c.P(), over.W = c.Q();
  lk::cuda::check_pool(over);
  auto xb = input_buffer<T>(x), wb = input_buffer<T>(w);
  Buffer<T> bb = bias.is_none() ? Buffer<T>(0, T(0), T(0)) : input_buffer<T>(bias);
  auto yb = output_buffer<T>(c.N * c.K * over.P() * over.Q());
  {
    py::gil_scoped_release release;
    lk::cuda::conv2d_max_pool2d(c, p, xb.get(), wb.get(), bias.is_none() ? nullptr : bb.get(), yb.get(), Stream{});
  }
  return to_numpy(yb, {c.N, c.K, over.P(), over.Q()}, "the pooled output");
}

template <class T>
py::array linear_impl(const lk::LinearDesc& d, const py::array& x, const py::array& w, const py::object& bias,
                      lk::cuda::LinearKernel kernel) {
  auto xb = input_buffer<T>(x), wb = input_buffer<T>(w);
  Buffer<T> bb = bias.is_none() ? Buffer<T>(0, T(0), T(0)) : input_buffer<T>(bias);
  auto yb = output_buffer<T>(d.M * d.N);
  {
    py::gil_scoped_release release;
    lk::cuda::linear(d, xb.get(), wb.get(), bias.is_none() ? nullptr : bb.get(), yb.get(), Stream{}, kernel);
  }
  return to_numpy(yb, {d.M, d.N}, "the linear output");
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

template <class T>
py::array relu_impl(const py::array& x) {
  auto xb = input_buffer<T>(x);
  auto yb = output_buffer<T>(static_cast<int64_t>(xb.size()));
  {
    py::gil_scoped_release release;
    lk::cuda::relu(xb.get(), yb.get(), static_cast<int64_t>(xb.size()), Stream{});
  }
  return to_numpy(yb, shape_of(x), "the relu output");
}

template <class T>
py::array softmax_impl(const py::array& x, int64_t dim, bool log, lk::cuda::SoftmaxKernel kernel) {
  const int64_t nd = x.ndim();
  if (dim < -std::max<int64_t>(nd, 1) || dim >= std::max<int64_t>(nd, 1)) throw py::index_error("dim: out of range");
  if (dim < 0) dim += std::max<int64_t>(nd, 1);
  int64_t outer = 1, len = 1, inner = 1;
  for (int64_t i = 0; i < nd; ++i) (i < dim ? outer : i == dim ? len : inner) *= x.shape(i);
  auto xb = input_buffer<T>(x);
  auto yb = output_buffer<T>(static_cast<int64_t>(xb.size()));
  {
    py::gil_scoped_release release;
    lk::cuda::softmax(xb.get(), yb.get(), outer, len, inner, log, Stream{}, kernel);
  }
  return to_numpy(yb, shape_of(x), "the softmax output");
}

// ---- backward ----

template <class T>
py::object optional_output(bool wanted, Buffer<T>& b, const std::vector<py::ssize_t>& shape, const char* what) {
  if (!wanted) return py::none();
  return to_numpy(b, shape, what);
}

template <class T>
py::tuple conv2d_backward_impl(const lk::Conv2dDesc& d, const py::array& go, const py::array& x, const py::array& w,
                               std::array<bool, 3> mask) {
  lk::cuda::check_conv2d_backward(d);
  expect_ndim(go, 4, "grad_output");
  same_dtype(x, go, "grad_output");
  if (go.shape(0) != d.N || go.shape(1) != d.K || go.shape(2) != d.P() || go.shape(3) != d.Q())
    throw py::value_error("grad_output: shape differs from the convolution's output");
  auto gob = input_buffer<T>(go), xb = input_buffer<T>(x), wb = input_buffer<T>(w);
  auto gi = output_buffer<T>(mask[0] ? d.N * d.C * d.H * d.W : 0);
  auto gw = output_buffer<T>(mask[1] ? d.K * d.Cg() * d.R * d.S : 0);
  auto gb = output_buffer<T>(mask[2] ? d.K : 0);
  {
    py::gil_scoped_release release;
    lk::cuda::conv2d_backward(d, gob.get(), xb.get(), wb.get(), mask[0] ? gi.get() : nullptr,
                              mask[1] ? gw.get() : nullptr, mask[2] ? gb.get() : nullptr, Stream{});
  }
  return py::make_tuple(optional_output(mask[0], gi, shape_of(x), "grad_input"),
                        optional_output(mask[1], gw, shape_of(w), "grad_weight"),
                        optional_output(mask[2], gb, {d.K}, "grad_bias"));
}

template <class T>
py::array max_pool2d_backward_impl(const py::array& go, const py::array& indices, std::array<int64_t, 4> in) {
  expect_ndim(go, 4, "grad_output");
  expect_ndim(indices, 4, "indices");
  if (!indices.dtype().equal(py::dtype::of<int64_t>())) throw py::type_error("indices: expected int64");
  for (int i = 0; i < 4; ++i)
    if (indices.shape(i) != go.shape(i)) throw py::value_error("indices: shape differs from grad_output's");
  if (go.shape(0) != in[0] || go.shape(1) != in[1]) throw py::value_error("input_shape: N, C differ from grad_output's");
  auto gob = input_buffer<T>(go);
  auto ib = input_buffer<int64_t>(indices);
  const int64_t planes = in[0] * in[1], HW = in[2] * in[3], PQ = go.shape(2) * go.shape(3);
  auto gi = output_buffer<T>(planes * HW);
  {
    py::gil_scoped_release release;
    lk::cuda::max_pool2d_backward(gob.get(), ib.get(), gi.get(), planes, HW, PQ, Stream{});
  }
  return to_numpy(gi, {in[0], in[1], in[2], in[3]}, "grad_input");
}

template <class T>
py::tuple linear_backward_impl(const py::array& go, const py::array& x, const py::array& w, std::array<bool, 3> mask) {
  lk::LinearDesc d;
  d.dtype = std::is_same_v<T, double> ? lk::DType::f64 : lk::DType::f32;
  d.M = x.shape(0), d.K = x.shape(1), d.N = w.shape(0);
  if (w.shape(1) != d.K || go.shape(0) != d.M || go.shape(1) != d.N)
    throw py::value_error("grad_output: shapes of grad_output, input and weight disagree");
  auto gob = input_buffer<T>(go), xb = input_buffer<T>(x), wb = input_buffer<T>(w);
  auto gi = output_buffer<T>(mask[0] ? d.M * d.K : 0);
  auto gw = output_buffer<T>(mask[1] ? d.N * d.K : 0);
  auto gb = output_buffer<T>(mask[2] ? d.N : 0);
  {
    py::gil_scoped_release release;
    lk::cuda::linear_backward(d, gob.get(), xb.get(), wb.get(), mask[0] ? gi.get() : nullptr,
                              mask[1] ? gw.get() : nullptr, mask[2] ? gb.get() : nullptr, Stream{});
  }
  return py::make_tuple(optional_output(mask[0], gi, {d.M, d.K}, "grad_input"),
                        optional_output(mask[1], gw, {d.N, d.K}, "grad_weight"),
                        optional_output(mask[2], gb, {d.N}, "grad_bias"));
}

template <class T>
py::array relu_backward_impl(const py::array& go, const py::array& y) {
  if (go.size() != y.size()) throw py::value_error("output: size differs from grad_output's");
  auto gob = input_buffer<T>(go), yb = input_buffer<T>(y);
  auto gi = output_buffer<T>(static_cast<int64_t>(gob.size()));
  {
    py::gil_scoped_release release;
    lk::cuda::relu_backward(gob.get(), yb.get(), gi.get(), static_cast<int64_t>(gob.size()), Stream{});
  }
  return to_numpy(gi, shape_of(go), "grad_input");
}

// Logits (N, C, d...) or (C,) as outer x classes x inner; target (N, d...) or ().
std::array<int64_t, 3> ce_layout(const py::array& x, const py::array& target) {
  if (x.ndim() < 1) throw py::value_error("input: expected at least 1 dimension");
  if (!target.dtype().equal(py::dtype::of<int64_t>())) throw py::type_error("target: expected int64");
  std::vector<py::ssize_t> want;
  int64_t outer = 1, classes, inner = 1;
  if (x.ndim() == 1) {
    classes = x.shape(0);
  } else {
    outer = x.shape(0), classes = x.shape(1);
    want.push_back(x.shape(0));
    for (py::ssize_t i = 2; i < x.ndim(); ++i) inner *= x.shape(i), want.push_back(x.shape(i));
  }
  if (shape_of(target) != want) throw py::value_error("target: shape does not match the input's");
  return {outer, classes, inner};
}

template <class T>
py::array cross_entropy_impl(const py::array& x, const py::array& target, const std::string& reduction,
                             int64_t ignore_index) {
  const auto [outer, classes, inner] = ce_layout(x, target);
  const auto r = lk::cuda_bindings::reduction_from(reduction);
  auto xb = input_buffer<T>(x);
  auto tb = input_buffer<int64_t>(target);
  const bool none = r == lk::cuda::Reduction::none;
  auto loss = output_buffer<T>(none ? outer * inner : 1);
  {
    py::gil_scoped_release release;
    lk::cuda::cross_entropy(xb.get(), tb.get(), loss.get(), outer, classes, inner, r, ignore_index, Stream{});
  }
  return to_numpy(loss, none ? shape_of(target) : std::vector<py::ssize_t>{}, "the loss");
}

template <class T>
py::array cross_entropy_backward_impl(const py::array& grad_loss, const py::array& x, const py::array& target,
                                      const std::string& reduction, int64_t ignore_index) {
  const auto [outer, classes, inner] = ce_layout(x, target);
  const auto r = lk::cuda_bindings::reduction_from(reduction);
  same_dtype(x, grad_loss, "grad_loss");
  if (grad_loss.size() != (r == lk::cuda::Reduction::none ? outer * inner : 1))
    throw py::value_error("grad_loss: expected one value per loss");
  auto gb = input_buffer<T>(grad_loss), xb = input_buffer<T>(x);
  auto tb = input_buffer<int64_t>(target);
  auto gi = output_buffer<T>(static_cast<int64_t>(xb.size()));
  {
    py::gil_scoped_release release;
    lk::cuda::cross_entropy_backward(gb.get(), xb.get(), tb.get(), gi.get(), outer, classes, inner, r, ignore_index,
                                     Stream{});
  }
  return to_numpy(gi, shape_of(x), "grad_input");
}

// Kernels that misuse the execution model on purpose, so the tests can
// check that the emulator notices.
namespace selftest {

constexpr int kThreads = 64;
using Tile = lk::cuda::SharedArray<float, kThreads>;

// Reverses each block's values through shared memory: right only if the
// barrier holds every thread until all have written their element.
template <bool Barrier>
__global__ void reverse_kernel(const float* in, float* out) {
  LK_SHARED(Tile, tile);
  const int t = static_cast<int>(threadIdx.x);
  const int base = static_cast<int>(blockIdx.x) * kThreads;
  tile[t] = in[base + t];
  if (Barrier) __syncthreads();
  out[base + t] = tile[kThreads - 1 - t];
}

__global__ void barrier_at_two_places(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Every thread adds 1 to out[0..3] 16 times each: exact only if the adds of
// blocks running at once on different OS threads are atomic.
__global__ void atomic_add(float* out) {
  for (int i = 0; i < 64; ++i) atomicAdd(out + i % 4, 1.0f);
}

__global__ void early_return(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shared_out_of_bounds(float* out) {
  LK_SHARED(Tile, tile);
  tile[static_cast<int>(threadIdx.x) + 1] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = tile[0];
}

// Element 0 is never written: every thread reads the poison.
__global__ void uninitialised_shared(float* out) {
  LK_SHARED(Tile, tile);
  if (threadIdx.x) tile[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = tile[0];
}

py::array run(const std::string& name, int blocks) {
  const int n = blocks * kThreads;
  std::vector<float> in(static_cast<size_t>(n)), out(static_cast<size_t>(n), -1.0f);
  for (int i = 0; i < n; ++i) in[static_cast<size_t>(i)] = static_cast<float>(i);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  {
    py::gil_scoped_release release;
    if (name == "reverse") {
      lk::emu::launch(grid, block, 0, &reverse_kernel<true>, in.data(), out.data());
    } else if (name == "reverse_without_barrier") {
      lk::emu::launch(grid, block, 0, &reverse_kernel<false>, in.data(), out.data());
    } else if (name == "barrier_at_two_places") {
      lk::emu::launch(grid, block, 0, &barrier_at_two_places, out.data());
    } else if (name == "atomic_add") {
      lk::emu::launch(grid, block, 0, &atomic_add, out.data());
    } else if (name == "early_return") {
      lk::emu::launch(grid, block, 0, &early_return, out.data());
    } else if (name == "shared_out_of_bounds") {
      lk::emu::launch(grid, block, 0, &shared_out_of_bounds, out.data());
    } else if (name == "uninitialised_shared") {
      lk::emu::launch(grid, block, 0, &uninitialised_shared, out.data());
    } else if (name == "too_many_threads") {
      lk::emu::launch(grid, dim3(2048), 0, &early_return, out.data());
    } else {
      throw std::invalid_argument("selftest: unknown kernel " + name);
    }
  }
  py::array_t<float> result(n);
  std::memcpy(result.mutable_data(), out.data(), out.size() * sizeof(float));
  return result;
}

}  // namespace selftest

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "The CUDA kernels compiled as C++ and run under a CPU emulation of the CUDA execution model (for tests)";
  py::register_exception<lk::emu::KernelError>(m, "KernelError", PyExc_RuntimeError);
  // The block tile of the GEMM kernels (rows, columns, reduction step), so
  // the tests can put shapes on its edges.
  m.attr("GEMM_TILE") = py::make_tuple(lk::cuda::Gemm::BM, lk::cuda::Gemm::BN, lk::cuda::Gemm::BK);

  m.def(
      "conv2d",
      [](const py::array& x, const py::array& w, const py::object& bias, Pair stride, Quad padding, Pair dilation,
         int64_t groups, bool relu, const std::string& kernel) -> py::array {
        const auto d = conv_desc(x, w, bias, stride, padding, dilation, groups, relu);
        const auto k = conv_kernel(kernel);
        return is_f64(x) ? conv2d_impl<double>(d, x, w, bias, k) : conv2d_impl<float>(d, x, w, bias, k);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::arg("relu"), py::arg("kernel") = "auto",
      "conv2d of an N x C x H x W input; padding is (top, bottom, left, right).");

  m.def(
      "conv2d_kernel",
      [](const py::array& x, const py::array& w, int64_t groups) {
        const auto d = conv_desc(x, w, py::none(), {1, 1}, {0, 0, 0, 0}, {1, 1}, groups, false);
        return lk::cuda::conv2d_kernel_for(d) == lk::cuda::ConvKernel::direct ? "direct" : "implicit_gemm";
      },
      py::arg("x"), py::arg("w"), py::arg("groups"), "The kernel conv2d picks for these shapes.");

  m.def(
      "max_pool2d",
      [](const py::array& x, Pair kernel, Pair stride, Pair padding, Pair dilation, bool ceil_mode,
         bool return_indices) -> py::object {
        expect_ndim(x, 4, "input");
        auto d = pool_desc(kernel, stride, padding, dilation, ceil_mode);
        d.N = x.shape(0), d.C = x.shape(1), d.H = x.shape(2), d.W = x.shape(3);
        d.dtype = is_f64(x) ? lk::DType::f64 : lk::DType::f32;
        py::tuple r = is_f64(x) ? max_pool2d_impl<double>(d, x, return_indices)
                                : max_pool2d_impl<float>(d, x, return_indices);
        return return_indices ? py::object(r) : py::object(r[0]);
      },
      py::arg("x"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("ceil_mode"), py::arg("return_indices"), "max_pool2d; with return_indices, (values, int64 indices).");

  m.def(
      "conv2d_max_pool2d",
      [](const py::array& x, const py::array& w, const py::object& bias, Pair stride, Quad padding, Pair dilation,
         int64_t groups, bool relu, Pair kernel_size, Pair pool_stride, Pair pool_padding, Pair pool_dilation,
         bool ceil_mode) -> py::array {
        const auto c = conv_desc(x, w, bias, stride, padding, dilation, groups, relu);
        const auto p = pool_desc(kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
        return is_f64(x) ? conv_pool_impl<double>(c, p, x, w, bias) : conv_pool_impl<float>(c, p, x, w, bias);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::arg("relu"), py::arg("kernel_size"), py::arg("pool_stride"), py::arg("pool_padding"),
      py::arg("pool_dilation"), py::arg("ceil_mode"), "The fused conv2d -> bias -> activation -> max_pool2d.");

  m.def(
      "conv_pool_tile",
      [](const py::array& x, const py::array& w, Pair stride, Quad padding, Pair dilation, int64_t groups,
         Pair kernel_size, Pair pool_stride, Pair pool_padding, Pair pool_dilation, bool ceil_mode) {
        const auto c = conv_desc(x, w, py::none(), stride, padding, dilation, groups, false);
        const auto p = pool_desc(kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode);
        const auto t = lk::cuda::conv_pool_tile(c, p, is_f64(x));
        return py::make_tuple(t.rows, t.cols);
      },
      py::arg("x"), py::arg("w"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
      py::arg("kernel_size"), py::arg("pool_stride"), py::arg("pool_padding"), py::arg("pool_dilation"),
      py::arg("ceil_mode"),
      "Pooled outputs per block (rows, cols) of the fused kernel; (0, 0) when the call runs unfused.");

  m.def(
      "linear",
      [](const py::array& x, const py::array& w, const py::object& bias, bool relu,
         const std::string& kernel) -> py::array {
        expect_ndim(x, 2, "input");
        expect_ndim(w, 2, "weight");
        same_dtype(x, w, "weight");
        lk::LinearDesc d;
        d.dtype = is_f64(x) ? lk::DType::f64 : lk::DType::f32;
        d.M = x.shape(0), d.K = x.shape(1), d.N = w.shape(0);
        if (w.shape(1) != d.K) throw py::value_error("weight: in_features differs from the input's");
        d.has_bias = !bias.is_none();
        if (d.has_bias) {
          auto b = py::reinterpret_borrow<py::array>(bias);
          same_dtype(x, b, "bias");
          if (b.ndim() != 1 || b.shape(0) != d.N) throw py::value_error("bias: expected one value per feature");
        }
        d.act = relu ? lk::Activation::relu : lk::Activation::none;
        const auto k = linear_kernel(kernel);
        return is_f64(x) ? linear_impl<double>(d, x, w, bias, k) : linear_impl<float>(d, x, w, bias, k);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("relu"), py::arg("kernel") = "auto",
      "linear of an M x K input with N x K weights.");

  m.def(
      "linear_kernel",
      [](int64_t M, int64_t N, int64_t K) {
        lk::LinearDesc d;
        d.M = M, d.N = N, d.K = K;
        return lk::cuda::linear_kernel_for(d) == lk::cuda::LinearKernel::dot ? "dot" : "gemm";
      },
      py::arg("M"), py::arg("N"), py::arg("K"), "The kernel linear picks for these sizes.");

  m.def(
      "relu", [](const py::array& x) -> py::array { return is_f64(x) ? relu_impl<double>(x) : relu_impl<float>(x); },
      py::arg("x"));

  m.def(
      "softmax",
      [](const py::array& x, int64_t dim, bool log, const std::string& kernel) -> py::array {
        const auto k = softmax_kernel(kernel);
        return is_f64(x) ? softmax_impl<double>(x, dim, log, k) : softmax_impl<float>(x, dim, log, k);
      },
      py::arg("x"), py::arg("dim"), py::arg("log") = false, py::arg("kernel") = "auto",
      "softmax (or log_softmax) along dim.");

  m.def(
      "softmax_kernel",
      [](int64_t outer, int64_t dim, int64_t inner) {
        return lk::cuda::softmax_kernel_for(outer, dim, inner) == lk::cuda::SoftmaxKernel::block_per_line
                   ? "block_per_line"
                   : "thread_per_line";
      },
      py::arg("outer"), py::arg("dim"), py::arg("inner"), "The kernel softmax picks for these sizes.");

  m.def(
      "conv2d_backward",
      [](const py::array& grad_output, const py::array& x, const py::array& w, Pair stride, Quad padding,
         Pair dilation, int64_t groups, std::array<bool, 3> output_mask) -> py::tuple {
        const auto d = conv_desc(x, w, py::none(), stride, padding, dilation, groups, false);
        return is_f64(x) ? conv2d_backward_impl<double>(d, grad_output, x, w, output_mask)
                         : conv2d_backward_impl<float>(d, grad_output, x, w, output_mask);
      },
      py::arg("grad_output"), py::arg("x"), py::arg("w"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::arg("output_mask") = std::array<bool, 3>{true, true, true},
      "(grad_input, grad_weight, grad_bias) of conv2d; padding is (top, bottom, left, right).");
  m.def(
      "max_pool2d_backward",
      [](const py::array& grad_output, const py::array& indices, std::array<int64_t, 4> input_shape) -> py::array {
        return is_f64(grad_output) ? max_pool2d_backward_impl<double>(grad_output, indices, input_shape)
                                   : max_pool2d_backward_impl<float>(grad_output, indices, input_shape);
      },
      py::arg("grad_output"), py::arg("indices"), py::arg("input_shape"));
  m.def(
      "linear_backward",
      [](const py::array& grad_output, const py::array& x, const py::array& w,
         std::array<bool, 3> output_mask) -> py::tuple {
        expect_ndim(grad_output, 2, "grad_output");
        expect_ndim(x, 2, "input");
        expect_ndim(w, 2, "weight");
        same_dtype(x, w, "weight");
        same_dtype(x, grad_output, "grad_output");
        return is_f64(x) ? linear_backward_impl<double>(grad_output, x, w, output_mask)
                         : linear_backward_impl<float>(grad_output, x, w, output_mask);
      },
      py::arg("grad_output"), py::arg("x"), py::arg("w"),
      py::arg("output_mask") = std::array<bool, 3>{true, true, true});
  m.def(
      "relu_backward",
      [](const py::array& grad_output, const py::array& output) -> py::array {
        same_dtype(output, grad_output, "grad_output");
        return is_f64(output) ? relu_backward_impl<double>(grad_output, output)
                              : relu_backward_impl<float>(grad_output, output);
      },
      py::arg("grad_output"), py::arg("output"));
  m.def(
      "cross_entropy",
      [](const py::array& x, const py::array& target, const std::string& reduction, int64_t ignore_index) {
        return is_f64(x) ? cross_entropy_impl<double>(x, target, reduction, ignore_index)
                         : cross_entropy_impl<float>(x, target, reduction, ignore_index);
      },
      py::arg("x"), py::arg("target"), py::arg("reduction") = "mean", py::arg("ignore_index") = -100,
      "softmax + cross-entropy of logits (N, C, d...) or (C,) against int64 class indices.");
  m.def(
      "cross_entropy_backward",
      [](const py::array& grad_loss, const py::array& x, const py::array& target, const std::string& reduction,
         int64_t ignore_index) {
        return is_f64(x) ? cross_entropy_backward_impl<double>(grad_loss, x, target, reduction, ignore_index)
                         : cross_entropy_backward_impl<float>(grad_loss, x, target, reduction, ignore_index);
      },
      py::arg("grad_loss"), py::arg("x"), py::arg("target"), py::arg("reduction") = "mean",
      py::arg("ignore_index") = -100);

  // The device-pointer entry points of _core.cuda, over host memory and
  // pretend devices: lepton_kernels._device runs on them in the tests.
  auto device = m.def_submodule("device", "The device-pointer kernels of _core.cuda, emulated over host memory");
  lk::cuda_bindings::register_cuda_ops(device);
  device.def("set_emulated_devices", &lk::cuda::set_emulated_devices, py::arg("sm_counts"),
             "Pretend devices, one per entry with that many multiprocessors.");
  device.def("plan_cache_info", [] {
    const lk::PlanCacheStats s = lk::plan_cache_stats();
    return py::make_tuple(s.hits, s.misses, s.size);
  });
  device.def("plan_cache_clear", &lk::plan_cache_clear);

  m.def("set_threads", &lk::emu::set_threads, py::arg("n"), "OS threads that run blocks.");
  m.def("threads", &lk::emu::threads);
  m.def("selftest", &selftest::run, py::arg("name"), py::arg("blocks") = 2,
        "Runs one of the emulator's test kernels; returns its output.");
}
