// GEMM microkernels for the avx512 level; this file alone gets its flags (CMakeLists.txt).
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/gemm_ukernel.inc"
}  // namespace

extern const UkernelTable kUkernels_avx512 = {
    Isa::avx512,
    {8, 48, &gemm_ukernel<float, 64, 8, 3>, "f32_gemm_ukernel_8x48__avx512"},
    {8, 24, &gemm_ukernel<double, 64, 8, 3>, "f64_gemm_ukernel_8x24__avx512"},
};

}  // namespace lk::cpu
