// Training kernels of the generic level: this translation unit alone is compiled with that level's flags (CMakeLists.txt).
#include "cpu/ukernels/train_ukernels.h"

namespace lk::cpu {
namespace {
#include "cpu/ukernels/train.inc"
}  // namespace

extern const TrainUkernelTable kTrainUkernels_generic = {
    &adam_ukernel<float>,
    &adam_ukernel<double>,
    &relu_backward_ukernel<float>,
    &relu_backward_ukernel<double>,
};

}  // namespace lk::cpu

namespace lk::cpu {

#ifdef LK_HAVE_X86_KERNELS
extern const TrainUkernelTable kTrainUkernels_avx2;
extern const TrainUkernelTable kTrainUkernels_avx512;
#endif

const TrainUkernelTable& train_ukernels() {
#ifdef LK_HAVE_X86_KERNELS
  const Isa isa = active_isa();
  if (isa == Isa::avx512) return kTrainUkernels_avx512;
  if (isa == Isa::avx2) return kTrainUkernels_avx2;
#endif
  return kTrainUkernels_generic;
}

}  // namespace lk::cpu
