// _core.cuda: the CUDA kernels on device pointers (bindings/cuda_ops.h),
// present only when the build has CUDA.
#include <pybind11/pybind11.h>

#ifdef LK_WITH_CUDA
#include "bindings/cuda_ops.h"
#endif

namespace lk::bindings {

namespace py = pybind11;

void register_cuda(py::module_& m) {
#ifdef LK_WITH_CUDA
  auto sub = m.def_submodule("cuda", "The CUDA kernels on device pointers (for lepton_kernels._device)");
  cuda_bindings::register_cuda_ops(sub);
#else
  (void)m;
#endif
}

}  // namespace lk::bindings
