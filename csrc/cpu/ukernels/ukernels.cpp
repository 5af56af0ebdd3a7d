#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

extern const UkernelTable kUkernels_generic;
#ifdef LK_HAVE_X86_KERNELS
extern const UkernelTable kUkernels_avx2;
extern const UkernelTable kUkernels_avx512;
#endif

const UkernelTable& ukernels(Isa isa) {
#ifdef LK_HAVE_X86_KERNELS
  if (isa == Isa::avx512) return kUkernels_avx512;
  if (isa == Isa::avx2) return kUkernels_avx2;
#endif
  (void)isa;
  return kUkernels_generic;
}

const UkernelTable& ukernels() { return ukernels(active_isa()); }

}  // namespace lk::cpu
