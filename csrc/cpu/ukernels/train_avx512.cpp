// Training kernels of the avx512 level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include "cpu/ukernels/train_ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/train.inc"
}  // namespace

extern const TrainUkernelTable kTrainUkernels_avx512 = {
    &adam_ukernel<float>,
    &adam_ukernel<double>,
    &relu_backward_ukernel<float>,
    &relu_backward_ukernel<double>,
};

}  // namespace lk::cpu
