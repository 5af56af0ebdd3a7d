// Networks planned once and run as one native call per batch.
//
// A Network is a chain of layers (convolution, max-pool, linear, ReLU,
// flatten, softmax). For each input shape it makes a NetPlan: the layers
// fused into stages (conv + bias + ReLU + max-pool into one pass, linear +
// ReLU, a final softmax into the last linear), a plan per stage from the
// planner, the weights packed for those plans, and one arena that holds
// every intermediate. A run is then one call: no Python between layers and
// no allocation after the plan is made.
//
// The convolutional stages run image by image when the batch is large enough:
// each thread takes its share of the images and sends each through every
// convolutional stage while its intermediates are still in L2 ("tile" mode).
// Small batches run stage after stage with each stage split across threads
// ("layer" mode). Dense layers run over the whole batch at once, so their
// weights are read once per batch instead of once per image; small ones (the
// dot kernel's, weights within half an L2) instead run in the tile lanes, four
// of a lane's images at a time, and in layer mode with a few images the first
// linear is split with the direct stage before it by features (one hand-off
// to the threads for both). 3x3 stride-1 convolutions with a 2x2 pool over
// channels in multiples of 16 take Winograd F(4x4, 3x3), over the planes of a
// first layer F(2, 3) along rows (AVX-512), and without the pool F(2x2, 3x3);
// a direct stage that writes channel planes unpooled puts a row's pixels in
// vector lanes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/descriptors.h"
#include "core/tensor.h"
#include "cpu/conv2d.h"

namespace lk::cpu {

enum class NetOp { conv2d, max_pool2d, linear, relu, flatten, softmax, log_softmax, identity };

// One layer as the caller describes it.
struct NetLayerSpec {
  NetOp op = NetOp::identity;
  std::string name;                 // the caller's name for it, for messages
  Conv2dDesc conv;                  // conv2d: everything but N, H, W
  std::optional<Pool2dDesc> pool;   // conv2d: a max-pool fused after it; max_pool2d: the pool
  ConvRestrict only;                // conv2d: a restriction of the algorithm
  Activation act = Activation::none;  // linear
  int64_t in_features = 0, out_features = 0;
  bool has_bias = false;
  int64_t dim = 1;                  // softmax: the axis (of the batched shape); flatten: start_dim
  std::vector<float> weight, bias;  // contiguous copies
};

class NetPlan;

// Whether a convolution (with the max-pool fused after it, if any) is the
// direct kernel's, shapes aside: a network stage takes it when the pool's
// output is also exactly half the convolution's.
bool direct_kernel_suits(const Conv2dDesc& d, const Pool2dDesc* pool, const ConvRestrict& only);
// Whether a layer alone (lk.Conv2d, lk.Conv2dMaxPool2d) runs as a one-layer
// network on the direct kernels: pooled, at column stride 1, or a reduction
// only the planes kernel takes (strided short ones stay with the GEMM); a
// stem that F(4, 4) on the column phases may take, with any pool (the
// network then runs the pool in a stage of its own where it does).
bool direct_layer_suits(const Conv2dDesc& d, const Pool2dDesc* pool, const ConvRestrict& only);

class Network {
 public:
  // Checks what can be checked without an input; throws std::invalid_argument
  // naming the layer.
  explicit Network(std::vector<NetLayerSpec> layers);
  ~Network();

  // The plan for a batched input shape (made on first use, validating the
  // chain), and the output's shape it produces.
  std::shared_ptr<NetPlan> plan_for(const std::vector<int64_t>& in) const;
  std::shared_ptr<NetPlan> plan_for(const int64_t* shape, int ndim) const;
  static const std::vector<int64_t>& output_shape(const NetPlan& plan);
  // Whether the plan's first stage is the direct kernel (a first layer with
  // few channels, or a convolution with its 2x2 pool fused).
  static bool starts_direct(const NetPlan& plan);
  static std::string describe(const NetPlan& plan);
  std::vector<int64_t> output_shape(const std::vector<int64_t>& in) const;
  // x: the batched input of the plan's shape, any strides when the first
  // stage is spatial, else contiguous; y: the output, contiguous. Concurrent
  // calls of one plan run one at a time (the plan's arena is shared).
  static void run(NetPlan& plan, const TensorView& x, float* y);
  void run(const TensorView& x, float* y) const;
  std::string describe(const std::vector<int64_t>& in) const;
  int64_t arena_bytes(const std::vector<int64_t>& in) const;
  bool strided_input() const;  // whether run() accepts a non-contiguous input
  int64_t plans_made() const;

 private:
  std::vector<NetLayerSpec> layers_;
  mutable std::mutex mu_;
  // A plan's key: the input shape, then the settings the plan depends on.
  static constexpr int kKeyLen = kMaxDims + 5;
  struct Key {
    int64_t v[kKeyLen];
    int n = 0;
    bool operator==(const Key& o) const { return n == o.n && std::equal(v, v + n, o.v); }
    bool operator<(const Key& o) const { return std::lexicographical_compare(v, v + n, o.v, o.v + o.n); }
  };
  mutable std::map<Key, std::shared_ptr<NetPlan>> plans_;
  mutable int64_t plans_made_ = 0;
  mutable Key last_key_;  // the plan of the last call: most calls repeat it
  mutable std::shared_ptr<NetPlan> last_plan_;
};

// Arenas allocated by every network of the process since it started (one
// per plan; a steady stream of calls adds none).
int64_t network_arena_allocations();

}  // namespace lk::cpu
