#include "cpu/layers.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "core/settings.h"
#include "core/thread_pool.h"
#include "cpu/network.h"
#include "cpu/pool2d.h"

namespace lk::cpu {

namespace {

template <class T>
AlignedPtr<T> contiguous_copy(const TensorView& v) {
  const int64_t n = v.numel();
  auto out = aligned_alloc_array<T>(static_cast<size_t>(n));
  int64_t idx[kMaxDims] = {};
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < v.ndim; ++d) off += idx[d] * v.strides[d];
    out[i] = v.ptr<T>()[off];
    for (int d = v.ndim - 1; d >= 0 && ++idx[d] == v.shape[d]; --d) idx[d] = 0;
  }
  return out;
}

// A layer's network plan for x when it starts with the direct kernel. Not
// while the scheduler autotunes: the network's kernels are not among the
// candidates it measures and stores.
std::shared_ptr<NetPlan> direct_plan(const Network* net, const Conv2dDesc& d, const TensorView& x) {
  if (!net || d.N == 0 || scheduler_settings().autotune) return nullptr;
  auto plan = net->plan_for(x.shape, 4);
  return Network::starts_direct(*plan) ? plan : nullptr;
}

template <class T>
TensorView contiguous_view(T* data, int ndim, const int64_t* shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype_of<T>();
  v.ndim = ndim;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

}  // namespace

template <class T>
Conv2dLayer<T>::Conv2dLayer(const TensorView& weight, const TensorView* bias, const Conv2dDesc& params,
                            std::optional<Pool2dDesc> pool, ConvRestrict only)
    : params_(params), pool_(pool), only_(only) {
  LK_CHECK(weight.ndim == 4 && weight.shape[0] == params.K && weight.shape[1] * params.groups == params.C &&
               weight.shape[2] == params.R && weight.shape[3] == params.S,
           "weight: shape does not match the layer's parameters");
  LK_CHECK(params.has_bias == (bias != nullptr), "bias: does not match the layer's parameters");
  weight_ = contiguous_copy<T>(weight);
  if (bias) bias_ = contiguous_copy<T>(*bias);
  if constexpr (std::is_same_v<T, float>) {
    if (direct_layer_suits(params_, pool_ ? &*pool_ : nullptr, only_)) {
      NetLayerSpec l;
      l.op = NetOp::conv2d;
      l.name = pool_ ? "conv2d_max_pool2d" : "conv2d";
      l.conv = params_, l.pool = pool_, l.has_bias = params_.has_bias;
      l.weight.assign(weight_.get(), weight_.get() + weight.numel());
      if (bias_) l.bias.assign(bias_.get(), bias_.get() + params_.K);
      std::vector<NetLayerSpec> layers;
      layers.push_back(std::move(l));
      net_ = std::make_unique<Network>(std::move(layers));
    }
  }
}

template <class T>
Conv2dLayer<T>::~Conv2dLayer() = default;

template <class T>
Conv2dDesc Conv2dLayer<T>::desc_for(const TensorView& x) const {
  LK_CHECK(x.ndim == 4, "input: expected a 4-D array");
  LK_CHECK(x.shape[1] == params_.C, "input: expected ", params_.C, " channels, got ", x.shape[1]);
  Conv2dDesc d = params_;
  d.N = x.shape[0], d.H = x.shape[2], d.W = x.shape[3];
  validate(d);
  return d;
}

template <class T>
void Conv2dLayer<T>::output_shape(const TensorView& x, int64_t shape[4]) const {
  const Conv2dDesc d = desc_for(x);
  shape[0] = d.N, shape[1] = d.K, shape[2] = d.P(), shape[3] = d.Q();
  if (pool_) {
    Pool2dDesc p = *pool_;
    p.N = d.N, p.C = d.K, p.H = d.P(), p.W = d.Q();
    validate(p);
    shape[2] = p.P(), shape[3] = p.Q();
  }
}

template <class T>
template <class Plan>
typename Conv2dPlan<T>::Weights Conv2dLayer<T>::weights_for(const Plan& plan) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = packed_.find(plan.weight_layout());
  if (it == packed_.end()) {
    const int64_t wshape[4] = {params_.K, params_.Cg(), params_.R, params_.S};
    const TensorView w = contiguous_view(weight_.get(), 4, wshape);
    const TensorView b = contiguous_view(bias_.get(), 1, &params_.K);
    it = packed_.emplace(plan.weight_layout(), plan.pack(w, bias_ ? &b : nullptr)).first;
  }
  return plan.bind(it->second);  // packed_ entries are never erased: the pointers stay valid
}

template <class T>
bool Conv2dLayer<T>::holds(const TensorView& weight, const TensorView* bias) const {
  const size_t wbytes = static_cast<size_t>(params_.K * params_.Cg() * params_.R * params_.S) * sizeof(T);
  if (weight.numel() * static_cast<int64_t>(sizeof(T)) != static_cast<int64_t>(wbytes) ||
      (bias != nullptr) != (bias_ != nullptr))
    return false;
  if (bias != nullptr && std::memcmp(bias->data, bias_.get(), static_cast<size_t>(params_.K) * sizeof(T)) != 0)
    return false;
  // A large weight's comparison reads twice its size, mostly from memory:
  // on every thread, in chunks (9.4 MB, two threads: 0.58 -> 0.48 ms).
  constexpr size_t kChunk = size_t{1} << 20;
  const auto* a = static_cast<const unsigned char*>(weight.data);
  const auto* b = reinterpret_cast<const unsigned char*>(weight_.get());
  if (wbytes <= 2 * kChunk) return std::memcmp(a, b, wbytes) == 0;
  std::atomic<bool> same{true};
  parallel_for(static_cast<int64_t>((wbytes + kChunk - 1) / kChunk), get_num_threads(), [&](int64_t i) {
    const size_t off = static_cast<size_t>(i) * kChunk;
    if (same.load(std::memory_order_relaxed) && std::memcmp(a + off, b + off, std::min(kChunk, wbytes - off)) != 0)
      same.store(false, std::memory_order_relaxed);
  });
  return same.load();
}

template <class T>
void Conv2dLayer<T>::run(const TensorView& x, T* y) const {
  const Conv2dDesc d = desc_for(x);
  if constexpr (std::is_same_v<T, float>) {
    if (auto net_plan = direct_plan(net_.get(), d, x)) {
      Network::run(*net_plan, x, y);
      return;
    }
  }
  if (pool_) {
    auto plan = plan_conv2d_max_pool2d<T>(d, *pool_, true, only_);
    plan->run(x, weights_for(plan->conv()), y);
  } else {
    const int64_t wshape[4] = {params_.K, params_.Cg(), params_.R, params_.S};
    const TensorView w = contiguous_view(weight_.get(), 4, wshape);
    const TensorView b = contiguous_view(bias_.get(), 1, &params_.K);
    const ConvCall<T> call{x, &w, bias_ ? &b : nullptr, y};
    auto plan = plan_conv2d<T>(d, true, &call, only_);
    plan->run(x, weights_for(*plan), y);
  }
}

template <class T>
std::string Conv2dLayer<T>::describe(const TensorView& x) const {
  const Conv2dDesc d = desc_for(x);
  if (auto net_plan = direct_plan(net_.get(), d, x)) return Network::describe(*net_plan);
  if (pool_) return plan_conv2d_max_pool2d<T>(d, *pool_, true, only_)->describe();
  return plan_conv2d<T>(d, true, nullptr, only_)->explain();
}

template <class T>
LinearLayer<T>::LinearLayer(const TensorView& weight, const TensorView* bias, Activation act)
    : K_(weight.shape[1]), N_(weight.shape[0]), act_(act) {
  LK_CHECK(weight.ndim == 2, "weight: expected a 2-D array");
  LK_CHECK(bias == nullptr || (bias->ndim == 1 && bias->shape[0] == N_), "bias: expected ", N_, " entries");
  weight_ = contiguous_copy<T>(weight);
  if (bias) bias_ = contiguous_copy<T>(*bias);
}

template <class T>
LinearDesc LinearLayer<T>::desc_for(int64_t rows) const {
  LinearDesc d;
  d.dtype = dtype_of<T>();
  d.M = rows, d.K = K_, d.N = N_;
  d.has_bias = bias_ != nullptr;
  d.act = act_;
  return d;
}

template <class T>
void LinearLayer<T>::run(const TensorView& x, T* y) const {
  LK_CHECK(x.ndim == 2 && x.shape[1] == K_, "input: expected ", K_, " features in the last dimension");
  auto plan = plan_linear<T>(desc_for(x.shape[0]), true);
  const PackedLinearWeights<T>* packed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = packed_.find(plan->weight_layout());
    if (it == packed_.end()) {
      const int64_t wshape[2] = {N_, K_};
      const TensorView w = contiguous_view(weight_.get(), 2, wshape);
      const TensorView b = contiguous_view(bias_.get(), 1, &N_);
      it = packed_.emplace(plan->weight_layout(), plan->pack(w, bias_ ? &b : nullptr)).first;
    }
    packed = &it->second;
  }
  plan->run(x, plan->bind(*packed), y);
}

template <class T>
std::string LinearLayer<T>::describe(int64_t rows) const {
  return plan_linear<T>(desc_for(rows), true)->describe();
}

template class Conv2dLayer<float>;
template class Conv2dLayer<double>;
template class LinearLayer<float>;
template class LinearLayer<double>;

}  // namespace lk::cpu
