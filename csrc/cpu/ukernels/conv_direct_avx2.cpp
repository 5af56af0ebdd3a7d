// The direct convolution kernel of the avx2 level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include <immintrin.h>

#include "cpu/conv_direct.h"

namespace lk::cpu {
namespace {
#define LK_DIR_VB 32
#include "cpu/ukernels/conv_direct.inc"
}  // namespace

extern const DirectConvFn kConvDirect_avx2 = &conv_direct_f32;
extern const DenseRowsFn kDenseRows_avx2 = &dense_rows_f32;
extern const SplitRowsFn kSplitRows_avx2 = &dir_split_rows_phases;

}  // namespace lk::cpu
