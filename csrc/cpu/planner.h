// Plans for each op, made on first use and then served from the plan cache.
#pragma once
#include <memory>

#include "core/descriptors.h"
#include "cpu/conv2d.h"
#include "cpu/conv_pool.h"
#include "cpu/linear.h"

namespace lk::cpu {

template <class T>
std::shared_ptr<const Conv2dPlan<T>> plan_conv2d(const Conv2dDesc& d);

template <class T>
std::shared_ptr<const Conv2dMaxPool2dPlan<T>> plan_conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool);

template <class T>
std::shared_ptr<const LinearPlan<T>> plan_linear(const LinearDesc& d);

}  // namespace lk::cpu
