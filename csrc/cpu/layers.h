// Layers: an op with its own weights, for callers that run it many times.
// A layer keeps a private contiguous copy of its weights (so a caller's later
// writes cannot make it stale) and packs them once per layout a plan asks
// for; plans come from the plan cache, one per input shape.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "core/descriptors.h"
#include "core/memory.h"
#include "cpu/planner.h"

namespace lk::cpu {

class Network;

template <class T>
class Conv2dLayer {
 public:
  using value_type = T;

  // params: everything but N, H, W. pool: fuse a max-pool after the activation.
  // only: restrict plans to one algorithm.
  Conv2dLayer(const TensorView& weight, const TensorView* bias, const Conv2dDesc& params,
              std::optional<Pool2dDesc> pool, ConvRestrict only = {});
  ~Conv2dLayer();

  // The descriptor for input x (validated), and the output's shape.
  Conv2dDesc desc_for(const TensorView& x) const;
  void output_shape(const TensorView& x, int64_t shape[4]) const;

  void run(const TensorView& x, T* y) const;
  std::string describe(const TensorView& x) const;
  // Whether a contiguous weight (and bias) hold the values of the layer's
  // copies, bit for bit.
  bool holds(const TensorView& weight, const TensorView* bias) const;

 private:
  template <class Plan>
  typename Conv2dPlan<T>::Weights weights_for(const Plan& conv_plan) const;

  Conv2dDesc params_;
  std::optional<Pool2dDesc> pool_;
  ConvRestrict only_;
  AlignedPtr<T> weight_;  // K x C/groups x R x S, contiguous
  AlignedPtr<T> bias_;
  mutable std::mutex mu_;
  mutable std::map<int, PackedConvWeights<T>> packed_;  // by layout
  // float32, few channels or a 2x2 max-pool: the layer as a one-layer
  // network, whose direct kernel (pooling in registers, Winograd on rows for
  // a first layer, pixels in lanes unpooled) takes the inputs it suits.
  std::unique_ptr<Network> net_;
};

template <class T>
class LinearLayer {
 public:
  using value_type = T;

  LinearLayer(const TensorView& weight, const TensorView* bias, Activation act);

  // x: M x K, any strides; y: M x N, contiguous.
  void run(const TensorView& x, T* y) const;
  std::string describe(int64_t rows) const;
  int64_t in_features() const { return K_; }
  int64_t out_features() const { return N_; }

 private:
  LinearDesc desc_for(int64_t rows) const;

  int64_t K_, N_;
  Activation act_;
  AlignedPtr<T> weight_;  // N x K, contiguous
  AlignedPtr<T> bias_;
  mutable std::mutex mu_;
  mutable std::map<int, PackedLinearWeights<T>> packed_;  // by layout
};

}  // namespace lk::cpu
