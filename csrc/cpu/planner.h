// Plans for each op, made on first use and then served from the plan cache.
#pragma once
#include <memory>
#include <optional>

#include "core/descriptors.h"
#include "cpu/conv2d.h"
#include "cpu/conv_pool.h"
#include "cpu/linear.h"

namespace lk::cpu {

// A call to autotune on: its input, its weights, and an output the
// candidates may overwrite.
template <class T>
struct ConvCall {
  const TensorView& x;
  const TensorView* weight;
  const TensorView* bias;
  T* y;
};

// prepacked: the caller (a layer) packs weights once for the plan it gets.
// With autotuning on (SchedulerSettings) and a call given, a plan missing
// from the cache is chosen by timing the model's best candidates on that
// call; the winner is kept in the plan store (LEPTON_CACHE_DIR) too.
// only: restrict the choice to one algorithm.
template <class T>
std::shared_ptr<const Conv2dPlan<T>> plan_conv2d(const Conv2dDesc& d, bool prepacked,
                                                 const ConvCall<T>* call = nullptr,
                                                 ConvRestrict only = {});

template <class T>
std::shared_ptr<const Conv2dMaxPool2dPlan<T>> plan_conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool,
                                                                     bool prepacked,
                                                                     ConvRestrict only = {});

// few_row_panels: as LinearPlan's.
template <class T>
std::shared_ptr<const LinearPlan<T>> plan_linear(const LinearDesc& d, bool prepacked, bool few_row_panels = true);

}  // namespace lk::cpu
