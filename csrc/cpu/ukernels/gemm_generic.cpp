// GEMM microkernels for the generic level; this file alone gets its flags (CMakeLists.txt).
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/gemm_ukernel.inc"
}  // namespace

extern const UkernelTable kUkernels_generic = {
    Isa::generic,
    {4, 12, &gemm_ukernel<float, 16, 4, 3>, "f32_gemm_ukernel_4x12__generic"},
    {4, 6, &gemm_ukernel<double, 16, 4, 3>, "f64_gemm_ukernel_4x6__generic"},
};

}  // namespace lk::cpu
