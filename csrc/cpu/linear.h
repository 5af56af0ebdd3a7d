// Fully-connected layer y = act(x W^T + b).
#pragma once
#include <atomic>
#include <string>

#include "core/descriptors.h"
#include "core/memory.h"
#include "core/tensor.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

enum class LinearAlgo {
  gemm,    // weight packed into the GEMM microkernel's B panels
  gemm_t,  // transposed (y^T = W x^T): the weight read in place as the GEMM's rows, the
           // input packed instead; for calls whose weight nobody packed in advance
  dot,     // few input rows or few outputs: dot products against weight rows in place
  gemv,    // a few input rows against a weight packed in panels one vector wide
};

// Weights packed once by LinearPlan::pack, for callers that run many times.
template <class T>
struct PackedLinearWeights {
  AlignedPtr<T> w;     // gemm, gemv: ceil(N/NR) panels of K x NR (gemm with an edge: the first
                       // columns' panels, then the edge's, LinearPlan::edge_); dot: N x K rows
  AlignedPtr<T> bias;  // N entries, zero-padded to a whole panel; or null
  int nr = 0;          // the layout packed for: LinearPlan::weight_layout()
};

template <class T>
class LinearPlan {
 public:
  // prepacked: the caller (a layer) packs weights once for the plan it gets.
  // few_row_panels: false keeps a few input rows on the dot kernel, the
  // weight as rows (which the network's split with a direct stage reads).
  LinearPlan(const LinearDesc& desc, bool prepacked, bool few_row_panels = true);

  struct Weights {
    const T* w;     // as in PackedLinearWeights
    int64_t ldw;    // row stride for dot
    const T* bias;  // gemm: readable for whole panels
  };
  struct BoundStorage {
    PackedLinearWeights<T> packed;
  };

  // weight: N x K (out_features x in_features), any strides; bias: N or null.
  PackedLinearWeights<T> pack(const TensorView& weight, const TensorView* bias) const;
  Weights bind(const PackedLinearWeights<T>& packed) const;
  // The caller's weights: read in place by the dot kernel when rows are
  // contiguous, else packed into storage for this run.
  Weights bind(const TensorView* weight, const TensorView* bias, BoundStorage& storage) const;

  // x: M x K, any strides; y: M x N, contiguous.
  void run(const TensorView& x, const Weights& wt, T* y) const;

  // Which packed layout this plan reads: NR of the panels (gemm with an
  // edge: NR + 1000 x the edge's NR), or 0 for rows.
  int weight_layout() const {
    return algo_ == LinearAlgo::gemm ? uk_.nr + (edge_ < d_.N ? 1000 * edge_uk_.nr : 0)
           : algo_ == LinearAlgo::gemv ? dot_.gemv_nr
                                       : 0;
  }

  std::string describe() const;
  double predicted_s() const { return predicted_s_; }
  int threads() const { return threads_; }

 private:
  void run_gemm(const TensorView& x, const Weights& wt, T* y) const;
  void run_dot(const TensorView& x, const Weights& wt, T* y) const;
  void run_gemm_t(const TensorView& x, const Weights& wt, T* y) const;
  void run_gemv(const TensorView& x, const Weights& wt, T* y) const;

  LinearDesc d_;
  LinearAlgo algo_;
  const UkernelTable* table_;  // the level active when the plan was made (Conv2dPlan::table_)
  GemmUkernel<T> uk_;
  DotUkernel<T> dot_;
  int64_t kc_ = 0, mc_ = 0, nc_ = 0;
  mutable std::atomic<uint32_t> gemv_calls_{0};  // gemv: odd calls read the panels backwards
  // gemm: columns [edge_, N) on the other tile shape, in blocks of edge_mc_
  // rows, where that pads less than either shape alone (N = edge_: none)
  GemmUkernel<T> edge_uk_{};
  int64_t edge_ = 0, edge_mc_ = 0;
  int threads_ = 1;
  double predicted_s_ = 0;
  int64_t workspace_ = 0;
};

}  // namespace lk::cpu
