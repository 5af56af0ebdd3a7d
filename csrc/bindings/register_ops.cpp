// The functional ops: check, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "bindings/arrays.h"
#include "cpu/activation.h"
#include "cpu/layer_cache.h"
#include "cpu/planner.h"
#include "cpu/pool2d.h"

namespace lk::bindings {

using I2 = std::array<int64_t, 2>;
using I4 = std::array<int64_t, 4>;

Activation activation_from(const std::string& name) {
  if (name == "none") return Activation::none;
  if (name == "relu") return Activation::relu;
  throw std::invalid_argument(cat("activation: expected None or 'relu', got '", name, "'"));
}

static void check_same_dtype(const Input& a, const Input& b, const char* name) {
  if (a.view.dtype != b.view.dtype)
    throw py::type_error(cat(name, ": dtype ", dtype_name(b.view.dtype), " does not match input dtype ",
                             dtype_name(a.view.dtype)));
}

template <class T>
static py::array conv2d_typed(const Conv2dDesc& d, const Input& x, const Input& w, const std::optional<Input>& b,
                              const py::object& out) {
  auto y = output_array<T>(out, {d.N, d.K, d.P(), d.Q()});
  T* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    const TensorView* bias_view = b ? &b->view : nullptr;
    if (auto layer = cpu::functional_conv_layer<T>(d, w.view, bias_view, std::nullopt)) {
      layer->run(x.view, yp);
    } else {
      const cpu::ConvCall<T> call{x.view, &w.view, bias_view, yp};
      auto plan = cpu::plan_conv2d<T>(d, false, &call);
      typename cpu::Conv2dPlan<T>::BoundStorage storage;
      plan->run(x.view, plan->bind(&w.view, bias_view, storage), yp);
    }
  }
  return y;
}

struct ConvArgs {
  Input x, w;
  std::optional<Input> b;
  Conv2dDesc d;
};

static ConvArgs conv_args(py::array input, py::array weight, std::optional<py::array> bias, I2 stride, I4 padding,
                          I2 dilation, int64_t groups, const std::string& activation) {
  ConvArgs a{input_view(input, "input", 4), input_view(weight, "weight", 4), std::nullopt, {}};
  check_same_dtype(a.x, a.w, "weight");
  if (bias) {
    a.b = input_view(*bias, "bias", 1);
    check_same_dtype(a.x, *a.b, "bias");
  }
  Conv2dDesc& d = a.d;
  d.dtype = a.x.view.dtype;
  d.N = a.x.view.shape[0], d.C = a.x.view.shape[1], d.H = a.x.view.shape[2], d.W = a.x.view.shape[3];
  d.K = a.w.view.shape[0], d.R = a.w.view.shape[2], d.S = a.w.view.shape[3];
  d.groups = groups;
  d.stride_h = stride[0], d.stride_w = stride[1];
  d.pad_top = padding[0], d.pad_bottom = padding[1], d.pad_left = padding[2], d.pad_right = padding[3];
  d.dil_h = dilation[0], d.dil_w = dilation[1];
  d.has_bias = a.b.has_value();
  d.act = activation_from(activation);
  cpu::validate(d);
  LK_CHECK(a.w.view.shape[1] * groups == d.C, "weight: expected ", d.C / groups, " input channels per group, got ",
           a.w.view.shape[1]);
  if (a.b) LK_CHECK(a.b->view.shape[0] == d.K, "bias: expected ", d.K, " entries, got ", a.b->view.shape[0]);
  return a;
}

static Pool2dDesc pool_desc(I2 kernel, I2 stride, I2 padding, I2 dilation, bool ceil_mode) {
  Pool2dDesc d;
  d.kh = kernel[0], d.kw = kernel[1];
  d.stride_h = stride[0], d.stride_w = stride[1];
  d.pad_h = padding[0], d.pad_w = padding[1];
  d.dil_h = dilation[0], d.dil_w = dilation[1];
  d.ceil_mode = ceil_mode;
  return d;
}

static py::array conv2d(py::array input, py::array weight, std::optional<py::array> bias, I2 stride, I4 padding,
                        I2 dilation, int64_t groups, const std::string& activation, py::object out) {
  ConvArgs a = conv_args(input, weight, bias, stride, padding, dilation, groups, activation);
  return a.d.dtype == DType::f32 ? conv2d_typed<float>(a.d, a.x, a.w, a.b, out)
                                 : conv2d_typed<double>(a.d, a.x, a.w, a.b, out);
}

// conv2d's arguments other than the arrays, converted once: the functional
// API keeps one per distinct argument set, so a repeated call skips both the
// Python normalisation and pybind's conversion of the tuples.
class Conv2dArgs {
 public:
  Conv2dArgs(I2 stride, I4 padding, I2 dilation, int64_t groups, const std::string& activation)
      : stride_(stride), padding_(padding), dilation_(dilation), groups_(groups), activation_(activation) {
    activation_from(activation);  // checked now
  }
  py::array call(py::array input, py::array weight, std::optional<py::array> bias) const {
    return conv2d(input, weight, bias, stride_, padding_, dilation_, groups_, activation_, py::none());
  }

 private:
  I2 stride_;
  I4 padding_;
  I2 dilation_;
  int64_t groups_;
  std::string activation_;
};

template <class T>
static py::object conv2d_max_pool2d_typed(const ConvArgs& a, const Pool2dDesc& pool, bool return_indices,
                                          const py::object& out) {
  const TensorView* bias_view = a.b ? &a.b->view : nullptr;
  std::shared_ptr<const cpu::Conv2dLayer<T>> layer;
  std::shared_ptr<const cpu::Conv2dMaxPool2dPlan<T>> plan;
  int64_t shape[4];
  {
    py::gil_scoped_release release;
    if (!return_indices) layer = cpu::functional_conv_layer<T>(a.d, a.w.view, bias_view, pool);
    if (layer) {
      layer->output_shape(a.x.view, shape);
    } else {
      plan = cpu::plan_conv2d_max_pool2d<T>(a.d, pool, false);
      const Pool2dDesc& p = plan->pool();
      shape[0] = p.N, shape[1] = p.C, shape[2] = p.P(), shape[3] = p.Q();
    }
  }
  auto y = output_array<T>(out, {shape[0], shape[1], shape[2], shape[3]});
  std::optional<py::array_t<int64_t>> idx;
  if (return_indices) idx.emplace(new_array<int64_t>({shape[0], shape[1], shape[2], shape[3]}));
  T* yp = y.mutable_data();
  int64_t* ip = idx ? idx->mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    if (layer) {
      layer->run(a.x.view, yp);
    } else {
      typename cpu::Conv2dPlan<T>::BoundStorage storage;
      plan->run(a.x.view, plan->conv().bind(&a.w.view, bias_view, storage), yp, ip);
    }
  }
  if (idx) return py::make_tuple(y, *idx);
  return y;
}

static py::object conv2d_max_pool2d(py::array input, py::array weight, std::optional<py::array> bias, I2 stride,
                                    I4 padding, I2 dilation, int64_t groups, const std::string& activation,
                                    I2 pool_kernel, I2 pool_stride, I2 pool_padding, I2 pool_dilation, bool ceil_mode,
                                    py::object out, bool return_indices) {
  ConvArgs a = conv_args(input, weight, bias, stride, padding, dilation, groups, activation);
  const Pool2dDesc pool = pool_desc(pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode);
  return a.d.dtype == DType::f32 ? conv2d_max_pool2d_typed<float>(a, pool, return_indices, out)
                                 : conv2d_max_pool2d_typed<double>(a, pool, return_indices, out);
}

template <class T>
static py::object max_pool2d_typed(const Pool2dDesc& d, const Input& x, bool return_indices, const py::object& out) {
  auto y = output_array<T>(out, {d.N, d.C, d.P(), d.Q()});
  std::optional<py::array_t<int64_t>> idx;
  if (return_indices) idx.emplace(new_array<int64_t>({d.N, d.C, d.P(), d.Q()}));
  T* yp = y.mutable_data();
  int64_t* ip = idx ? idx->mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    cpu::max_pool2d<T>(d, x.view, yp, ip);
  }
  if (idx) return py::make_tuple(y, *idx);
  return y;
}

static py::object max_pool2d(py::array input, I2 kernel, I2 stride, I2 padding, I2 dilation, bool ceil_mode,
                             bool return_indices, py::object out) {
  Input x = input_view(input, "input", 4);
  Pool2dDesc d = pool_desc(kernel, stride, padding, dilation, ceil_mode);
  d.dtype = x.view.dtype;
  d.N = x.view.shape[0], d.C = x.view.shape[1], d.H = x.view.shape[2], d.W = x.view.shape[3];
  cpu::validate(d);
  return d.dtype == DType::f32 ? max_pool2d_typed<float>(d, x, return_indices, out)
                               : max_pool2d_typed<double>(d, x, return_indices, out);
}

template <class T>
static py::array linear_typed(const LinearDesc& d, const Input& x, const Input& w, const std::optional<Input>& b,
                              const py::object& out) {
  auto y = output_array<T>(out, {d.M, d.N});
  T* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    auto plan = cpu::plan_linear<T>(d, false);
    typename cpu::LinearPlan<T>::BoundStorage storage;
    plan->run(x.view, plan->bind(&w.view, b ? &b->view : nullptr, storage), yp);
  }
  return y;
}

static py::array linear(py::array input, py::array weight, std::optional<py::array> bias,
                        const std::string& activation, py::object out) {
  Input x = input_view(input, "input", 2), w = input_view(weight, "weight", 2);
  check_same_dtype(x, w, "weight");
  std::optional<Input> b;
  if (bias) {
    b = input_view(*bias, "bias", 1);
    check_same_dtype(x, *b, "bias");
  }
  LinearDesc d;
  d.dtype = x.view.dtype;
  d.M = x.view.shape[0], d.K = x.view.shape[1], d.N = w.view.shape[0];
  LK_CHECK(w.view.shape[1] == d.K, "weight: expected ", d.K, " input features, got ", w.view.shape[1]);
  if (b) LK_CHECK(b->view.shape[0] == d.N, "bias: expected ", d.N, " entries, got ", b->view.shape[0]);
  d.has_bias = b.has_value();
  d.act = activation_from(activation);
  return d.dtype == DType::f32 ? linear_typed<float>(d, x, w, b, out) : linear_typed<double>(d, x, w, b, out);
}

// relu and softmax work on C-contiguous arrays (Python makes them so).
template <class T, class F>
static py::array elementwise(py::array x, py::object out, F&& f) {
  LK_CHECK((x.flags() & py::array::c_style) != 0, "input: must be C-contiguous");
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  auto y = output_array<T>(out, shape);
  const T* xp = static_cast<const T*>(x.data());
  T* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    f(xp, yp);
  }
  return y;
}

static py::array relu(py::array x, py::object out) {
  const int64_t n = x.size();
  if (is_f32(x)) return elementwise<float>(x, out, [n](const float* a, float* b) { cpu::relu(a, b, n); });
  if (!is_f64(x)) throw py::type_error("input: expected dtype float32 or float64");
  return elementwise<double>(x, out, [n](const double* a, double* b) { cpu::relu(a, b, n); });
}

static py::array softmax(py::array x, int64_t outer, int64_t dim, int64_t inner, bool log, py::object out) {
  LK_CHECK(outer >= 0 && dim >= 0 && inner >= 0 && outer * dim * inner == x.size(), "dim: bad split of the input");
  if (is_f32(x))
    return elementwise<float>(x, out, [=](const float* a, float* b) { cpu::softmax(a, b, outer, dim, inner, log); });
  if (!is_f64(x)) throw py::type_error("input: expected dtype float32 or float64");
  return elementwise<double>(x, out, [=](const double* a, double* b) { cpu::softmax(a, b, outer, dim, inner, log); });
}

// What the functional ops would run: the same plans (weights not prepacked).
static std::string describe_conv2d(py::array input, py::array weight, std::optional<py::array> bias, I2 stride,
                                   I4 padding, I2 dilation, int64_t groups, const std::string& activation) {
  ConvArgs a = conv_args(input, weight, bias, stride, padding, dilation, groups, activation);
  py::gil_scoped_release release;
  return a.d.dtype == DType::f32 ? cpu::plan_conv2d<float>(a.d, false)->explain()
                                 : cpu::plan_conv2d<double>(a.d, false)->explain();
}

static std::string describe_conv2d_max_pool2d(py::array input, py::array weight, std::optional<py::array> bias,
                                              I2 stride, I4 padding, I2 dilation, int64_t groups,
                                              const std::string& activation, I2 pool_kernel, I2 pool_stride,
                                              I2 pool_padding, I2 pool_dilation, bool ceil_mode) {
  ConvArgs a = conv_args(input, weight, bias, stride, padding, dilation, groups, activation);
  const Pool2dDesc pool = pool_desc(pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode);
  py::gil_scoped_release release;
  return a.d.dtype == DType::f32 ? cpu::plan_conv2d_max_pool2d<float>(a.d, pool, false)->describe()
                                 : cpu::plan_conv2d_max_pool2d<double>(a.d, pool, false)->describe();
}

static std::string describe_linear(int64_t rows, py::array weight, bool has_bias, const std::string& activation) {
  Input w = input_view(weight, "weight", 2);
  LinearDesc d;
  d.dtype = w.view.dtype;
  d.M = rows, d.K = w.view.shape[1], d.N = w.view.shape[0];
  d.has_bias = has_bias;
  d.act = activation_from(activation);
  py::gil_scoped_release release;
  return d.dtype == DType::f32 ? cpu::plan_linear<float>(d, false)->describe()
                               : cpu::plan_linear<double>(d, false)->describe();
}

void register_ops(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<Conv2dArgs>(m, "Conv2dArgs")
      .def(py::init<I2, I4, I2, int64_t, const std::string&>())
      .def("__call__", &Conv2dArgs::call, "input"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert());
  m.def("describe_conv2d", &describe_conv2d);
  m.def("describe_conv2d_max_pool2d", &describe_conv2d_max_pool2d);
  m.def("describe_linear", &describe_linear);
  m.def("conv2d", &conv2d, "input"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert(), "stride"_a,
        "padding"_a, "dilation"_a, "groups"_a, "activation"_a, "out"_a);
  m.def("conv2d_max_pool2d", &conv2d_max_pool2d, "input"_a.noconvert(), "weight"_a.noconvert(),
        "bias"_a.noconvert(), "stride"_a, "padding"_a, "dilation"_a, "groups"_a, "activation"_a, "pool_kernel_size"_a,
        "pool_stride"_a, "pool_padding"_a, "pool_dilation"_a, "ceil_mode"_a, "out"_a, "return_indices"_a = false);
  m.def("max_pool2d", &max_pool2d, "input"_a.noconvert(), "kernel_size"_a, "stride"_a, "padding"_a, "dilation"_a,
        "ceil_mode"_a, "return_indices"_a, "out"_a);
  m.def("linear", &linear, "input"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert(), "activation"_a,
        "out"_a);
  m.def("relu", &relu, "input"_a.noconvert(), "out"_a);
  m.def("softmax", &softmax, "input"_a.noconvert(), "outer"_a, "dim"_a, "inner"_a, "log"_a, "out"_a);
}

}  // namespace lk::bindings
