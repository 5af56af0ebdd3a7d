#include "cpu/planner.h"

#include "core/cpu_features.h"
#include "core/plan_cache.h"
#include "core/thread_pool.h"

namespace lk::cpu {

namespace {

enum OpId : int64_t { kConv2d = 1, kConv2dMaxPool2d = 2, kLinear = 3 };

// What every plan depends on besides its descriptor.
PlanKey key_for(OpId op, DType dtype) {
  PlanKey k;
  k.add(op).add(static_cast<int64_t>(dtype)).add(static_cast<int64_t>(active_isa())).add(get_num_threads());
  return k;
}

void add_conv(PlanKey& k, const Conv2dDesc& d) {
  k.add(d.N).add(d.C).add(d.H).add(d.W).add(d.K).add(d.R).add(d.S).add(d.groups);
  k.add(d.stride_h).add(d.stride_w).add(d.pad_top).add(d.pad_bottom).add(d.pad_left).add(d.pad_right);
  k.add(d.dil_h).add(d.dil_w).add(d.has_bias).add(static_cast<int64_t>(d.act));
}

}  // namespace

template <class T>
std::shared_ptr<const Conv2dPlan<T>> plan_conv2d(const Conv2dDesc& d) {
  PlanKey k = key_for(kConv2d, dtype_of<T>());
  add_conv(k, d);
  return cached<Conv2dPlan<T>>(k, [&] { return std::make_shared<const Conv2dPlan<T>>(d); });
}

template <class T>
std::shared_ptr<const Conv2dMaxPool2dPlan<T>> plan_conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& p) {
  PlanKey k = key_for(kConv2dMaxPool2d, dtype_of<T>());
  add_conv(k, conv);
  k.add(p.kh).add(p.kw).add(p.stride_h).add(p.stride_w).add(p.pad_h).add(p.pad_w).add(p.dil_h).add(p.dil_w);
  k.add(p.ceil_mode);
  return cached<Conv2dMaxPool2dPlan<T>>(k, [&] { return std::make_shared<const Conv2dMaxPool2dPlan<T>>(conv, p); });
}

template <class T>
std::shared_ptr<const LinearPlan<T>> plan_linear(const LinearDesc& d) {
  PlanKey k = key_for(kLinear, dtype_of<T>());
  k.add(d.M).add(d.K).add(d.N).add(d.has_bias).add(static_cast<int64_t>(d.act));
  return cached<LinearPlan<T>>(k, [&] { return std::make_shared<const LinearPlan<T>>(d); });
}

template std::shared_ptr<const Conv2dPlan<float>> plan_conv2d<float>(const Conv2dDesc&);
template std::shared_ptr<const Conv2dPlan<double>> plan_conv2d<double>(const Conv2dDesc&);
template std::shared_ptr<const Conv2dMaxPool2dPlan<float>> plan_conv2d_max_pool2d<float>(const Conv2dDesc&,
                                                                                         const Pool2dDesc&);
template std::shared_ptr<const Conv2dMaxPool2dPlan<double>> plan_conv2d_max_pool2d<double>(const Conv2dDesc&,
                                                                                           const Pool2dDesc&);
template std::shared_ptr<const LinearPlan<float>> plan_linear<float>(const LinearDesc&);
template std::shared_ptr<const LinearPlan<double>> plan_linear<double>(const LinearDesc&);

}  // namespace lk::cpu
