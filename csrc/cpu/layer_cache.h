// Layers for functional calls (lk.conv2d, lk.conv2d_max_pool2d), opt-in:
// with a capacity set, such a call runs on a layer made for its weight, as a
// module would, and calls repeating the weight reuse it: weights packed once,
// on the kernels that need them packed (the direct ones, Winograd), where
// otherwise each call binds and packs its weights itself. A layer is found
// by the weight's and bias's addresses and everything else it is made of,
// and used only while their values equal the copies it packed, compared in
// full at every call: a weight changed in place gives a new layer. Every
// call of a weight runs on a layer, so repeated calls give the same bits.
// Bounded by the bytes of the weights kept, least recently used first.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>

#include "core/descriptors.h"
#include "core/tensor.h"
#include "cpu/layers.h"

namespace lk::cpu {

// The layer for a call's weight and bias (d: the call's descriptor, its N,
// H and W aside; pool: fused after the activation), kept or made now; null
// where the call binds its weights itself: the cache off (capacity 0, the
// default), or a weight or bias that is not contiguous.
template <class T>
std::shared_ptr<const Conv2dLayer<T>> functional_conv_layer(const Conv2dDesc& d, const TensorView& weight,
                                                            const TensorView* bias,
                                                            const std::optional<Pool2dDesc>& pool);

struct LayerCacheStats {
  int64_t hits = 0, misses = 0;  // calls that ran on a kept layer, and those that made one
  int64_t layers = 0, bytes = 0;  // layers kept, and the bytes of their weights and biases
  int64_t capacity = 0;           // bytes
};

LayerCacheStats layer_cache_stats();
void layer_cache_clear();  // drops every layer, resets the counters
void layer_cache_set_capacity(int64_t bytes);

}  // namespace lk::cpu
