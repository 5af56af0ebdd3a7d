// Microkernels of the generic level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/kernels.inc"
#include "cpu/ukernels/maxpool.inc"
}  // namespace

extern const UkernelTable kUkernels_generic = {
    Isa::generic,
    {
     {4, 12, &gemm_ukernel<float, 16, 4, 3, true>, &gemm_ukernel<float, 16, 4, 3, false>,
      &gemm_ukernel_indirect<float, 16, 4, 3>, "f32_gemm_ukernel_4x12__generic"},
     {6, 8, &gemm_ukernel<float, 16, 6, 2, true>, &gemm_ukernel<float, 16, 6, 2, false>,
      &gemm_ukernel_indirect<float, 16, 6, 2>, "f32_gemm_ukernel_6x8__generic"},
     {4, 8, &gemm_ukernel<float, 16, 4, 2, true>, &gemm_ukernel<float, 16, 4, 2, false>,
      &gemm_ukernel_indirect<float, 16, 4, 2>, "f32_gemm_ukernel_4x8__generic"}},
    {
     {4, 6, &gemm_ukernel<double, 16, 4, 3, true>, &gemm_ukernel<double, 16, 4, 3, false>,
      &gemm_ukernel_indirect<double, 16, 4, 3>, "f64_gemm_ukernel_4x6__generic"},
     {6, 4, &gemm_ukernel<double, 16, 6, 2, true>, &gemm_ukernel<double, 16, 6, 2, false>,
      &gemm_ukernel_indirect<double, 16, 6, 2>, "f64_gemm_ukernel_6x4__generic"},
     {4, 4, &gemm_ukernel<double, 16, 4, 2, true>, &gemm_ukernel<double, 16, 4, 2, false>,
      &gemm_ukernel_indirect<double, 16, 4, 2>, "f64_gemm_ukernel_4x4__generic"}},
    {&dot_ukernel<float, 16, 4>, "f32_dot_ukernel_4x4__generic",
     &gemv_panels<float, 16>, 4, "f32_gemv_ukernel_4__generic"},
    {&dot_ukernel<double, 16, 4>, "f64_dot_ukernel_4x2__generic",
     &gemv_panels<double, 16>, 2, "f64_gemv_ukernel_2__generic"},
    {{&maxpool_ukernel_2x2s2<float, 16>, "f32_maxpool_ukernel_2x2s2__generic"},
     {&maxpool_ukernel_window<float, 16, 1>, "f32_maxpool_ukernel_s1__generic"},
     {&maxpool_ukernel_window<float, 16, 2>, "f32_maxpool_ukernel_s2__generic"}},
    {{&maxpool_ukernel_2x2s2<double, 16>, "f64_maxpool_ukernel_2x2s2__generic"},
     {&maxpool_ukernel_window<double, 16, 1>, "f64_maxpool_ukernel_s1__generic"},
     {&maxpool_ukernel_window<double, 16, 2>, "f64_maxpool_ukernel_s2__generic"}},
    {&transpose_ukernel<float, 16>, "f32_transpose_ukernel_4x4__generic"},
    {&transpose_ukernel<double, 16>, "f64_transpose_ukernel_2x2__generic"},
    {&dwconv_ukernel<float, 16>, 4, "f32_dwconv_ukernel_4__generic"},
    {&dwconv_ukernel<double, 16>, 2, "f64_dwconv_ukernel_2__generic"},
    {&fma_peak_ukernel<16, 12>, 48, "f32_fma_peak_ukernel_12x4__generic"},
};

}  // namespace lk::cpu
