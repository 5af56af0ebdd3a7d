// The direct convolution kernel of the generic level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include "cpu/conv_direct.h"

namespace lk::cpu {
namespace {
#define LK_DIR_VB 16
#include "cpu/ukernels/conv_direct.inc"
}  // namespace

extern const DirectConvFn kConvDirect_generic = &conv_direct_f32;
extern const DenseRowsFn kDenseRows_generic = &dense_rows_f32;
extern const SplitRowsFn kSplitRows_generic = &dir_split_rows_phases;

}  // namespace lk::cpu
