// Microkernels of the avx512 level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include <immintrin.h>

#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/kernels.inc"
#include "cpu/ukernels/maxpool.inc"
}  // namespace

extern const UkernelTable kUkernels_avx512 = {
    Isa::avx512,
    {
     {8, 48, &gemm_ukernel<float, 64, 8, 3, true>, &gemm_ukernel<float, 64, 8, 3, false>,
      &gemm_ukernel_indirect<float, 64, 8, 3>, "f32_gemm_ukernel_8x48__avx512"},
     {12, 32, &gemm_ukernel<float, 64, 12, 2, true>, &gemm_ukernel<float, 64, 12, 2, false>,
      &gemm_ukernel_indirect<float, 64, 12, 2>, "f32_gemm_ukernel_12x32__avx512"},
     {8, 32, &gemm_ukernel<float, 64, 8, 2, true>, &gemm_ukernel<float, 64, 8, 2, false>,
      &gemm_ukernel_indirect<float, 64, 8, 2>, "f32_gemm_ukernel_8x32__avx512"}},
    {
     {8, 24, &gemm_ukernel<double, 64, 8, 3, true>, &gemm_ukernel<double, 64, 8, 3, false>,
      &gemm_ukernel_indirect<double, 64, 8, 3>, "f64_gemm_ukernel_8x24__avx512"},
     {12, 16, &gemm_ukernel<double, 64, 12, 2, true>, &gemm_ukernel<double, 64, 12, 2, false>,
      &gemm_ukernel_indirect<double, 64, 12, 2>, "f64_gemm_ukernel_12x16__avx512"},
     {8, 16, &gemm_ukernel<double, 64, 8, 2, true>, &gemm_ukernel<double, 64, 8, 2, false>,
      &gemm_ukernel_indirect<double, 64, 8, 2>, "f64_gemm_ukernel_8x16__avx512"}},
    {&dot_ukernel<float, 64, 6>, "f32_dot_ukernel_4x16__avx512",
     &gemv_panels<float, 64>, 16, "f32_gemv_ukernel_16__avx512"},
    {&dot_ukernel<double, 64, 6>, "f64_dot_ukernel_4x8__avx512",
     &gemv_panels<double, 64>, 8, "f64_gemv_ukernel_8__avx512"},
    // 256-bit vectors for 2x2 and stride 1: on the development machine (AMD,
    // 512-bit operations in two halves) their 512-bit versions ran up to 2x
    // slower once the input streams from memory, and no faster from cache.
    {{&maxpool_ukernel_2x2s2<float, 32>, "f32_maxpool_ukernel_2x2s2__avx512"},
     {&maxpool_ukernel_window<float, 32, 1>, "f32_maxpool_ukernel_s1__avx512"},
     {&maxpool_ukernel_window<float, 64, 2>, "f32_maxpool_ukernel_s2__avx512"}},
    {{&maxpool_ukernel_2x2s2<double, 32>, "f64_maxpool_ukernel_2x2s2__avx512"},
     {&maxpool_ukernel_window<double, 32, 1>, "f64_maxpool_ukernel_s1__avx512"},
     {&maxpool_ukernel_window<double, 64, 2>, "f64_maxpool_ukernel_s2__avx512"}},
    {&transpose_ukernel<float, 64>, "f32_transpose_ukernel_16x16__avx512"},
    {&transpose_ukernel<double, 64>, "f64_transpose_ukernel_8x8__avx512"},
    // 256-bit vectors: on the development machine (AMD, 512-bit operations in
    // two halves) the 512-bit version was no faster, and up to 7x slower
    // before the window and stride were compile-time constants.
    {&dwconv_ukernel<float, 32>, 8, "f32_dwconv_ukernel_8__avx512"},
    {&dwconv_ukernel<double, 32>, 4, "f64_dwconv_ukernel_4__avx512"},
    {&fma_peak_ukernel<64, 12>, 192, "f32_fma_peak_ukernel_12x16__avx512"},
};

}  // namespace lk::cpu
