// Layers (ops that own their weights): check, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <memory>
#include <optional>
#include <variant>

#include "bindings/arrays.h"
#include "cpu/layers.h"

namespace lk::bindings {

using I2 = std::array<int64_t, 2>;
using I4 = std::array<int64_t, 4>;

Activation activation_from(const std::string& name);

namespace {

// One class per layer for Python; the dtype is fixed by the weights.
class Conv2dLayer {
 public:
  Conv2dLayer(py::array weight, std::optional<py::array> bias, int64_t in_channels, I2 stride, I4 padding,
              I2 dilation, int64_t groups, const std::string& activation, std::optional<std::array<I2, 4>> pool,
              bool ceil_mode, const std::string& algorithm, int64_t ukernel) {
    Input w = input_view(weight, "weight", 4);
    std::optional<Input> b;
    if (bias) b = input_view(*bias, "bias", 1);
    LK_CHECK(!b || b->view.dtype == w.view.dtype, "bias: dtype does not match weight");
    Conv2dDesc d;
    d.dtype = w.view.dtype;
    d.C = in_channels, d.K = w.view.shape[0], d.R = w.view.shape[2], d.S = w.view.shape[3];
    d.groups = groups;
    d.stride_h = stride[0], d.stride_w = stride[1];
    d.pad_top = padding[0], d.pad_bottom = padding[1], d.pad_left = padding[2], d.pad_right = padding[3];
    d.dil_h = dilation[0], d.dil_w = dilation[1];
    d.has_bias = b.has_value();
    d.act = activation_from(activation);
    std::optional<Pool2dDesc> p;
    if (pool) {
      p.emplace();
      const auto& [k, s, pad, dil] = *pool;
      p->kh = k[0], p->kw = k[1], p->stride_h = s[0], p->stride_w = s[1];
      p->pad_h = pad[0], p->pad_w = pad[1], p->dil_h = dil[0], p->dil_w = dil[1];
      p->ceil_mode = ceil_mode;
    }
    cpu::ConvRestrict only;
    if (algorithm != "auto") only.algo = cpu::conv_algo_from(algorithm);
    if (ukernel >= 0) {
      LK_CHECK(ukernel < cpu::kGemmShapes, "ukernel: expected a shape index below ", cpu::kGemmShapes);
      only.shape = static_cast<int>(ukernel);
    }
    if (d.dtype == DType::f32)
      layer_ = std::make_unique<cpu::Conv2dLayer<float>>(w.view, b ? &b->view : nullptr, d, p, only);
    else
      layer_ = std::make_unique<cpu::Conv2dLayer<double>>(w.view, b ? &b->view : nullptr, d, p, only);
  }

  py::array call(py::array input, py::object out) const {
    Input x = input_view(input, "input", 4);
    return std::visit(
        [&](const auto& layer) -> py::array {
          using T = typename std::decay_t<decltype(*layer)>::value_type;
          check_dtype<T>(x);
          int64_t shape[4];
          layer->output_shape(x.view, shape);
          auto y = output_array<T>(out, {shape[0], shape[1], shape[2], shape[3]});
          T* yp = y.mutable_data();
          {
            py::gil_scoped_release release;
            layer->run(x.view, yp);
          }
          return y;
        },
        layer_);
  }

  std::string describe(py::array input) const {
    Input x = input_view(input, "input", 4);
    return std::visit([&](const auto& layer) { return layer->describe(x.view); }, layer_);
  }

 private:
  template <class T>
  static void check_dtype(const Input& x) {
    if (x.view.dtype != dtype_of<T>())
      throw py::type_error(cat("input: dtype ", dtype_name(x.view.dtype), " does not match the layer's weights (",
                               dtype_name(dtype_of<T>()), ")"));
  }

  std::variant<std::unique_ptr<cpu::Conv2dLayer<float>>, std::unique_ptr<cpu::Conv2dLayer<double>>> layer_;
};

class LinearLayer {
 public:
  LinearLayer(py::array weight, std::optional<py::array> bias, const std::string& activation) {
    Input w = input_view(weight, "weight", 2);
    std::optional<Input> b;
    if (bias) b = input_view(*bias, "bias", 1);
    LK_CHECK(!b || b->view.dtype == w.view.dtype, "bias: dtype does not match weight");
    const Activation act = activation_from(activation);
    if (w.view.dtype == DType::f32)
      layer_ = std::make_unique<cpu::LinearLayer<float>>(w.view, b ? &b->view : nullptr, act);
    else
      layer_ = std::make_unique<cpu::LinearLayer<double>>(w.view, b ? &b->view : nullptr, act);
  }

  // input: M x K (the Python side flattens leading dimensions).
  py::array call(py::array input, py::object out) const {
    Input x = input_view(input, "input", 2);
    return std::visit(
        [&](const auto& layer) -> py::array {
          using T = typename std::decay_t<decltype(*layer)>::value_type;
          if (x.view.dtype != dtype_of<T>())
            throw py::type_error(cat("input: dtype ", dtype_name(x.view.dtype),
                                     " does not match the layer's weights (", dtype_name(dtype_of<T>()), ")"));
          LK_CHECK(x.view.shape[1] == layer->in_features(), "input: expected ", layer->in_features(),
                   " features in the last dimension, got ", x.view.shape[1]);
          auto y = output_array<T>(out, {x.view.shape[0], layer->out_features()});
          T* yp = y.mutable_data();
          {
            py::gil_scoped_release release;
            layer->run(x.view, yp);
          }
          return y;
        },
        layer_);
  }

  std::string describe(int64_t rows) const {
    return std::visit([&](const auto& layer) { return layer->describe(rows); }, layer_);
  }

 private:
  std::variant<std::unique_ptr<cpu::LinearLayer<float>>, std::unique_ptr<cpu::LinearLayer<double>>> layer_;
};

}  // namespace

void register_layers(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<Conv2dLayer>(m, "Conv2dLayer")
      .def(py::init<py::array, std::optional<py::array>, int64_t, I2, I4, I2, int64_t, const std::string&,
                    std::optional<std::array<I2, 4>>, bool, const std::string&, int64_t>(),
           "weight"_a.noconvert(), "bias"_a.noconvert(), "in_channels"_a, "stride"_a, "padding"_a, "dilation"_a,
           "groups"_a, "activation"_a, "pool"_a, "ceil_mode"_a, "algorithm"_a, "ukernel"_a)
      .def("__call__", &Conv2dLayer::call, "input"_a.noconvert(), "out"_a = py::none())
      .def("describe", &Conv2dLayer::describe, "input"_a.noconvert());
  py::class_<LinearLayer>(m, "LinearLayer")
      .def(py::init<py::array, std::optional<py::array>, const std::string&>(), "weight"_a.noconvert(),
           "bias"_a.noconvert(), "activation"_a)
      .def("__call__", &LinearLayer::call, "input"_a.noconvert(), "out"_a = py::none())
      .def("describe", &LinearLayer::describe, "rows"_a);
}

}  // namespace lk::bindings
