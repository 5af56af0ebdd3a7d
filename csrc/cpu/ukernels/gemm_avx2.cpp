// GEMM microkernels for the avx2 level; this file alone gets its flags (CMakeLists.txt).
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/gemm_ukernel.inc"
}  // namespace

extern const UkernelTable kUkernels_avx2 = {
    Isa::avx2,
    {4, 24, &gemm_ukernel<float, 32, 4, 3>, "f32_gemm_ukernel_4x24__avx2"},
    {4, 12, &gemm_ukernel<double, 32, 4, 3>, "f64_gemm_ukernel_4x12__avx2"},
};

}  // namespace lk::cpu
