// Fully-connected layer y = act(x W^T + b).
#pragma once
#include <string>

#include "core/descriptors.h"
#include "core/memory.h"
#include "core/tensor.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

enum class LinearAlgo {
  gemm,  // weight packed into the GEMM microkernel's B panels
  dot,   // few input rows or few outputs: dot products against weight rows in place
};

template <class T>
class LinearPlan {
 public:
  explicit LinearPlan(const LinearDesc& desc);

  // Packs weight (N x K, any strides) and bias (N or null) into the plan, for
  // callers that run many times; run() then ignores the weights it is given.
  void pack(const TensorView& weight, const TensorView* bias);

  // x: M x K, any strides; y: M x N, contiguous.
  void run(const TensorView& x, const TensorView* weight, const TensorView* bias, T* y) const;

  std::string describe() const;

 private:
  void pack_into(const TensorView& w, const TensorView* b, AlignedPtr<T>& wdst, AlignedPtr<T>& bdst) const;
  void run_gemm(const TensorView& x, const T* w, const T* b, T* y) const;
  void run_dot(const TensorView& x, const T* w, int64_t ldw, const T* b, T* y) const;

  LinearDesc d_;
  LinearAlgo algo_;
  GemmUkernel<T> uk_;
  DotUkernel<T> dot_;
  int64_t kc_ = 0, mc_ = 0, nc_ = 0;
  int threads_ = 1;
  bool packed_ = false;
  AlignedPtr<T> weights_;  // gemm: ceil(N/NR) panels of K x NR; dot: N x K rows
  AlignedPtr<T> bias_;     // N entries, zero-padded to a whole panel
};

}  // namespace lk::cpu
