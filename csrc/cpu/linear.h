// Fully-connected layer y = x W^T + b: the weight is packed once into the
// microkernel's B panels, the input is packed block by block as it is used.
#pragma once
#include <string>

#include "core/descriptors.h"
#include "core/memory.h"
#include "core/tensor.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

template <class T>
class LinearPlan {
 public:
  // weight: N x K (out_features x in_features), any strides; bias: N or null.
  LinearPlan(const LinearDesc& desc, const TensorView& weight, const TensorView* bias);

  // x: M x K, any strides; y: M x N, contiguous.
  void run(const TensorView& x, T* y) const;

  std::string describe() const;

 private:
  LinearDesc d_;
  GemmUkernel<T> uk_;
  int64_t kc_ = 0, mc_ = 0, nc_ = 0;
  int threads_ = 1;
  AlignedPtr<T> weights_;  // ceil(N/NR) panels of K x NR
  AlignedPtr<T> bias_;     // N entries, zero-padded to a whole panel
};

}  // namespace lk::cpu
