#include "cpu/planner.h"

#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "core/cpu_features.h"
#include "core/plan_cache.h"
#include "core/plan_store.h"
#include "core/settings.h"
#include "core/thread_pool.h"

namespace lk::cpu {

namespace {

enum OpId : int64_t { kConv2d = 1, kConv2dMaxPool2d = 2, kLinear = 3 };

// What every plan depends on besides its descriptor.
PlanKey key_for(OpId op, DType dtype) {
  const SchedulerSettings s = scheduler_settings();
  int64_t weight_bits;
  std::memcpy(&weight_bits, &s.memory_weight, sizeof weight_bits);
  PlanKey k;
  k.add(op).add(static_cast<int64_t>(dtype)).add(static_cast<int64_t>(active_isa())).add(get_num_threads());
  k.add(s.memory_budget).add(weight_bits);
  return k;
}

void add_conv(PlanKey& k, const Conv2dDesc& d) {
  k.add(d.N).add(d.C).add(d.H).add(d.W).add(d.K).add(d.R).add(d.S).add(d.groups);
  k.add(d.stride_h).add(d.stride_w).add(d.pad_top).add(d.pad_bottom).add(d.pad_left).add(d.pad_right);
  k.add(d.dil_h).add(d.dil_w).add(d.has_bias).add(static_cast<int64_t>(d.act));
}

std::vector<int64_t> encode(const ConvChoice& c) {
  return {static_cast<int64_t>(c.algo), c.kc, c.mc, c.nc, c.shape, c.threads};
}

std::optional<ConvChoice> decode(const std::vector<int64_t>& v) {
  if (v.size() != 6 || v[0] < 0 || v[0] > static_cast<int64_t>(ConvAlgo::direct)) return std::nullopt;
  ConvChoice c;
  c.algo = static_cast<ConvAlgo>(v[0]);
  c.kc = v[1], c.mc = v[2], c.nc = v[3], c.shape = static_cast<int>(v[4]), c.threads = static_cast<int>(v[5]);
  return c;
}

constexpr int kAutotuneCandidates = 4;

template <class T>
std::shared_ptr<const Conv2dPlan<T>> autotune(const Conv2dDesc& d, bool prepacked, const ConvCall<T>& call,
                                             const PlanKey& key, ConvRestrict only) {
  std::vector<ConvChoice> candidates = Conv2dPlan<T>(d, prepacked, nullptr, only).candidates();
  if (candidates.size() > kAutotuneCandidates) candidates.resize(kAutotuneCandidates);
  std::shared_ptr<const Conv2dPlan<T>> best;
  double best_s = 1e300;
  for (const ConvChoice& c : candidates) {
    auto plan = std::make_shared<const Conv2dPlan<T>>(d, prepacked, &c, only);
    typename Conv2dPlan<T>::BoundStorage storage;
    const auto wt = plan->bind(call.weight, call.bias, storage);  // packing is not part of a layer's run
    double t = 1e300;
    for (int rep = 0; rep < 3; ++rep) {  // the first run also warms caches and scratch buffers
      const auto t0 = std::chrono::steady_clock::now();
      plan->run(call.x, wt, call.y);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep > 0) t = std::min(t, s);
    }
    if (t < best_s) best_s = t, best = plan;
  }
  store_choice(key, encode(best->choice()));
  return best;
}

}  // namespace

template <class T>
std::shared_ptr<const Conv2dPlan<T>> plan_conv2d(const Conv2dDesc& d, bool prepacked, const ConvCall<T>* call,
                                                 ConvRestrict only) {
  PlanKey k = key_for(kConv2d, dtype_of<T>());
  add_conv(k, d);
  k.add(prepacked).add(only.key());
  return cached<Conv2dPlan<T>>(k, [&]() -> std::shared_ptr<const Conv2dPlan<T>> {
    if (auto stored = stored_choice(k)) {
      if (auto choice = decode(*stored)) {
        try {
          return std::make_shared<const Conv2dPlan<T>>(d, prepacked, &*choice, only);
        } catch (const std::invalid_argument&) {
          // a stale or damaged entry: plan afresh below
        }
      }
    }
    if (call != nullptr && scheduler_settings().autotune) return autotune(d, prepacked, *call, k, only);
    return std::make_shared<const Conv2dPlan<T>>(d, prepacked, nullptr, only);
  });
}

template <class T>
std::shared_ptr<const Conv2dMaxPool2dPlan<T>> plan_conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& p,
                                                                     bool prepacked, ConvRestrict only) {
  PlanKey k = key_for(kConv2dMaxPool2d, dtype_of<T>());
  add_conv(k, conv);
  k.add(prepacked).add(only.key());
  k.add(p.kh).add(p.kw).add(p.stride_h).add(p.stride_w).add(p.pad_h).add(p.pad_w).add(p.dil_h).add(p.dil_w);
  k.add(p.ceil_mode);
  return cached<Conv2dMaxPool2dPlan<T>>(
      k, [&] { return std::make_shared<const Conv2dMaxPool2dPlan<T>>(conv, p, prepacked, only); });
}

template <class T>
std::shared_ptr<const LinearPlan<T>> plan_linear(const LinearDesc& d, bool prepacked, bool few_row_panels) {
  PlanKey k = key_for(kLinear, dtype_of<T>());
  k.add(d.M).add(d.K).add(d.N).add(d.has_bias).add(static_cast<int64_t>(d.act)).add(prepacked).add(few_row_panels);
  return cached<LinearPlan<T>>(
      k, [&] { return std::make_shared<const LinearPlan<T>>(d, prepacked, few_row_panels); });
}

template std::shared_ptr<const Conv2dPlan<float>> plan_conv2d<float>(const Conv2dDesc&, bool, const ConvCall<float>*,
                                                                      ConvRestrict);
template std::shared_ptr<const Conv2dPlan<double>> plan_conv2d<double>(const Conv2dDesc&, bool, const ConvCall<double>*,
                                                                      ConvRestrict);
template std::shared_ptr<const Conv2dMaxPool2dPlan<float>> plan_conv2d_max_pool2d<float>(const Conv2dDesc&, const Pool2dDesc&, bool, ConvRestrict);
template std::shared_ptr<const Conv2dMaxPool2dPlan<double>> plan_conv2d_max_pool2d<double>(const Conv2dDesc&, const Pool2dDesc&, bool, ConvRestrict);
template std::shared_ptr<const LinearPlan<float>> plan_linear<float>(const LinearDesc&, bool, bool);
template std::shared_ptr<const LinearPlan<double>> plan_linear<double>(const LinearDesc&, bool, bool);

}  // namespace lk::cpu
