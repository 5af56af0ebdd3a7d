// The extension module: wires the register_* units together, nothing else.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace lk::bindings {
void register_ops(py::module_& m);
void register_config(py::module_& m);
void register_layers(py::module_& m);
void register_cuda(py::module_& m);
void register_backward(py::module_& m);
void register_network(py::module_& m);
}  // namespace lk::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "lepton-kernels native core";
  m.attr("__version__") = LK_VERSION;
  lk::bindings::register_ops(m);
  lk::bindings::register_config(m);
  lk::bindings::register_layers(m);
  lk::bindings::register_cuda(m);
  lk::bindings::register_backward(m);
  lk::bindings::register_network(m);
}
