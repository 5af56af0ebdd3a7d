// Networks (lk.Sequential): parse the layer list, check, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "cpu/network.h"

namespace lk::bindings {

Activation activation_from(const std::string& name);

namespace {

using I2 = std::array<int64_t, 2>;
using I4 = std::array<int64_t, 4>;

std::vector<float> float_copy(const py::handle& h, const std::string& what) {
  auto a = py::reinterpret_borrow<py::array>(h);
  if (!is_f32(a)) throw py::type_error(cat(what, ": expected dtype float32"));
  a = py::array::ensure(a, py::array::c_style);
  const float* p = static_cast<const float*>(a.data());
  return std::vector<float>(p, p + a.size());
}

Pool2dDesc pool_from(const py::handle& h, bool ceil_mode) {
  const auto [k, s, pad, dil] = h.cast<std::array<I2, 4>>();
  Pool2dDesc p;
  p.kh = k[0], p.kw = k[1], p.stride_h = s[0], p.stride_w = s[1];
  p.pad_h = pad[0], p.pad_w = pad[1], p.dil_h = dil[0], p.dil_w = dil[1];
  p.ceil_mode = ceil_mode;
  return p;
}

cpu::NetLayerSpec spec_from(const py::dict& d, size_t index) {
  cpu::NetLayerSpec s;
  const std::string op = d["op"].cast<std::string>();
  s.name = d["name"].cast<std::string>();
  const std::string where = cat("layer ", index, " (", s.name, ")");
  if (op == "conv2d") {
    s.op = cpu::NetOp::conv2d;
    auto w = py::reinterpret_borrow<py::array>(d["weight"]);
    LK_CHECK(w.ndim() == 4, where, ": weight must be 4-D");
    s.weight = float_copy(w, where + " weight");
    Conv2dDesc& c = s.conv;
    c.C = d["in_channels"].cast<int64_t>();
    c.K = w.shape(0), c.R = w.shape(2), c.S = w.shape(3);
    c.groups = d["groups"].cast<int64_t>();
    const I2 stride = d["stride"].cast<I2>(), dil = d["dilation"].cast<I2>();
    const I4 pad = d["padding"].cast<I4>();
    c.stride_h = stride[0], c.stride_w = stride[1];
    c.pad_top = pad[0], c.pad_bottom = pad[1], c.pad_left = pad[2], c.pad_right = pad[3];
    c.dil_h = dil[0], c.dil_w = dil[1];
    c.act = activation_from(d["activation"].cast<std::string>());
    if (!d["bias"].is_none()) {
      s.bias = float_copy(d["bias"], where + " bias");
      c.has_bias = true;
    }
    s.has_bias = c.has_bias;
    if (!d["pool"].is_none()) s.pool = pool_from(d["pool"], d["ceil_mode"].cast<bool>());
    const std::string algorithm = d["algorithm"].cast<std::string>();
    if (algorithm != "auto") s.only.algo = cpu::conv_algo_from(algorithm);
    const int64_t ukernel = d["ukernel"].cast<int64_t>();
    if (ukernel >= 0) {
      LK_CHECK(ukernel < cpu::kGemmShapes, where, ": ukernel: expected a shape index below ", cpu::kGemmShapes);
      s.only.shape = static_cast<int>(ukernel);
    }
  } else if (op == "max_pool2d") {
    s.op = cpu::NetOp::max_pool2d;
    s.pool = pool_from(d["pool"], d["ceil_mode"].cast<bool>());
  } else if (op == "linear") {
    s.op = cpu::NetOp::linear;
    auto w = py::reinterpret_borrow<py::array>(d["weight"]);
    LK_CHECK(w.ndim() == 2, where, ": weight must be 2-D");
    s.weight = float_copy(w, where + " weight");
    s.out_features = w.shape(0), s.in_features = w.shape(1);
    s.act = activation_from(d["activation"].cast<std::string>());
    if (!d["bias"].is_none()) {
      s.bias = float_copy(d["bias"], where + " bias");
      s.has_bias = true;
    }
  } else if (op == "relu") {
    s.op = cpu::NetOp::relu;
  } else if (op == "flatten") {
    s.op = cpu::NetOp::flatten;
    s.dim = d["start_dim"].cast<int64_t>();
  } else if (op == "softmax" || op == "log_softmax") {
    s.op = op == "softmax" ? cpu::NetOp::softmax : cpu::NetOp::log_softmax;
    s.dim = d["dim"].cast<int64_t>();
  } else if (op == "identity") {
    s.op = cpu::NetOp::identity;
  } else {
    throw std::invalid_argument(cat(where, ": unknown op '", op, "'"));
  }
  return s;
}

class Network {
 public:
  explicit Network(const py::list& layers) {
    std::vector<cpu::NetLayerSpec> specs;
    for (size_t i = 0; i < layers.size(); ++i) specs.push_back(spec_from(layers[i].cast<py::dict>(), i));
    net_ = std::make_unique<cpu::Network>(std::move(specs));
  }

  py::array call(py::array input, py::object out) const {
    LK_CHECK(input.ndim() >= 1 && input.ndim() <= kMaxDims, "input: expected 1 to ", kMaxDims, " dimensions");
    Input x = input_view(input, "input", static_cast<int>(input.ndim()));
    if (x.view.dtype != DType::f32)
      throw py::type_error(cat("input: expected dtype float32 (the network's weights), got ", dtype_name(x.view.dtype)));
    LK_CHECK(net_->strided_input() || (x.array.flags() & py::array::c_style) != 0,
             "input: must be C-contiguous for this network");
    const auto plan = net_->plan_for(x.view.shape, x.view.ndim);
    auto y = output_array<float>(out, cpu::Network::output_shape(*plan));
    float* yp = y.mutable_data();
    {
      py::gil_scoped_release release;
      cpu::Network::run(*plan, x.view, yp);
    }
    return y;
  }

  std::vector<int64_t> output_shape(const std::vector<int64_t>& in) const { return net_->output_shape(in); }
  std::string describe(const std::vector<int64_t>& in) const { return net_->describe(in); }
  int64_t arena_bytes(const std::vector<int64_t>& in) const { return net_->arena_bytes(in); }
  bool strided_input() const { return net_->strided_input(); }
  int64_t plans_made() const { return net_->plans_made(); }

 private:
  std::unique_ptr<cpu::Network> net_;
};

}  // namespace

void register_network(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<Network>(m, "Network")
      .def(py::init<const py::list&>(), "layers"_a)
      .def("__call__", &Network::call, "input"_a.noconvert(), "out"_a = py::none())
      .def("output_shape", &Network::output_shape, "input_shape"_a)
      .def("describe", &Network::describe, "input_shape"_a)
      .def("arena_bytes", &Network::arena_bytes, "input_shape"_a)
      .def_property_readonly("strided_input", &Network::strided_input)
      .def_property_readonly("plans_made", &Network::plans_made);
  m.def("network_arena_allocations", &cpu::network_arena_allocations);
}

}  // namespace lk::bindings
