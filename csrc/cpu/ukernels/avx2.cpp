// Microkernels of the avx2 level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/kernels.inc"
#include "cpu/ukernels/maxpool.inc"
}  // namespace

extern const UkernelTable kUkernels_avx2 = {
    Isa::avx2,
    {
     {4, 24, &gemm_ukernel<float, 32, 4, 3, true>, &gemm_ukernel<float, 32, 4, 3, false>,
      &gemm_ukernel_indirect<float, 32, 4, 3>, "f32_gemm_ukernel_4x24__avx2"},
     {6, 16, &gemm_ukernel<float, 32, 6, 2, true>, &gemm_ukernel<float, 32, 6, 2, false>,
      &gemm_ukernel_indirect<float, 32, 6, 2>, "f32_gemm_ukernel_6x16__avx2"},
     {4, 16, &gemm_ukernel<float, 32, 4, 2, true>, &gemm_ukernel<float, 32, 4, 2, false>,
      &gemm_ukernel_indirect<float, 32, 4, 2>, "f32_gemm_ukernel_4x16__avx2"}},
    {
     {4, 12, &gemm_ukernel<double, 32, 4, 3, true>, &gemm_ukernel<double, 32, 4, 3, false>,
      &gemm_ukernel_indirect<double, 32, 4, 3>, "f64_gemm_ukernel_4x12__avx2"},
     {6, 8, &gemm_ukernel<double, 32, 6, 2, true>, &gemm_ukernel<double, 32, 6, 2, false>,
      &gemm_ukernel_indirect<double, 32, 6, 2>, "f64_gemm_ukernel_6x8__avx2"},
     {4, 8, &gemm_ukernel<double, 32, 4, 2, true>, &gemm_ukernel<double, 32, 4, 2, false>,
      &gemm_ukernel_indirect<double, 32, 4, 2>, "f64_gemm_ukernel_4x8__avx2"}},
    {&dot_ukernel<float, 32, 4>, "f32_dot_ukernel_4x8__avx2",
     &gemv_panels<float, 32>, 8, "f32_gemv_ukernel_8__avx2"},
    {&dot_ukernel<double, 32, 4>, "f64_dot_ukernel_4x4__avx2",
     &gemv_panels<double, 32>, 4, "f64_gemv_ukernel_4__avx2"},
    {{&maxpool_ukernel_2x2s2<float, 32>, "f32_maxpool_ukernel_2x2s2__avx2"},
     {&maxpool_ukernel_window<float, 32, 1>, "f32_maxpool_ukernel_s1__avx2"},
     {&maxpool_ukernel_window<float, 32, 2>, "f32_maxpool_ukernel_s2__avx2"}},
    {{&maxpool_ukernel_2x2s2<double, 32>, "f64_maxpool_ukernel_2x2s2__avx2"},
     {&maxpool_ukernel_window<double, 32, 1>, "f64_maxpool_ukernel_s1__avx2"},
     {&maxpool_ukernel_window<double, 32, 2>, "f64_maxpool_ukernel_s2__avx2"}},
    {&transpose_ukernel<float, 32>, "f32_transpose_ukernel_8x8__avx2"},
    {&transpose_ukernel<double, 32>, "f64_transpose_ukernel_4x4__avx2"},
    {&dwconv_ukernel<float, 32>, 8, "f32_dwconv_ukernel_8__avx2"},
    {&dwconv_ukernel<double, 32>, 4, "f64_dwconv_ukernel_4__avx2"},
    {&fma_peak_ukernel<32, 12>, 96, "f32_fma_peak_ukernel_12x8__avx2"},
};

}  // namespace lk::cpu
