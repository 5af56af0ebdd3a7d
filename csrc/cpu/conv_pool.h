// Fused convolution -> bias -> activation -> max-pool: one pass, tile by
// tile. Each task computes a band of convolution rows into a buffer that
// stays in cache and pools it at once; the full-resolution convolution
// output is never written to memory.
#pragma once
#include <string>

#include "core/descriptors.h"
#include "core/tensor.h"
#include "cpu/conv2d.h"

namespace lk::cpu {

template <class T>
class Conv2dMaxPool2dPlan {
 public:
  // pool: kernel, stride, padding, dilation and ceil_mode; its N, C, H, W are
  // taken from the convolution's output.
  Conv2dMaxPool2dPlan(const Conv2dDesc& conv, const Pool2dDesc& pool, bool prepacked,
                      ConvRestrict only = {});

  const Conv2dPlan<T>& conv() const { return conv_; }

  // x: N x C x H x W, any strides; y: N x K x P' x Q' (pooled), contiguous.
  // indices (optional, same shape as y): each maximum's position flattened
  // over the convolution output's P x Q plane, as max_pool2d reports it.
  void run(const TensorView& x, const typename Conv2dPlan<T>::Weights& wt, T* y, int64_t* indices = nullptr) const;

  std::string describe() const;
  const Pool2dDesc& pool() const { return pool_; }

 private:
  Conv2dPlan<T> conv_;
  Pool2dDesc pool_;
  int64_t rows_per_task_ = 1;  // pooled output rows
  int threads_ = 1;
};

}  // namespace lk::cpu
