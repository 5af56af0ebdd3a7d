#include "cpu/layer_cache.h"

#include <atomic>
#include <list>
#include <mutex>
#include <unordered_map>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/plan_cache.h"

namespace lk::cpu {

namespace {

constexpr size_t kMaxLayers = 4096;  // besides the bytes: many small weights

struct KeyHash {
  size_t operator()(const PlanKey& k) const { return k.hash(); }
};

struct Entry {
  std::shared_ptr<const void> layer;  // a Conv2dLayer<T>
  int64_t bytes = 0;                  // its weight's and bias's
  std::list<PlanKey>::iterator age;
};

struct Cache {
  std::mutex mu;
  std::unordered_map<PlanKey, Entry, KeyHash> entries;
  std::list<PlanKey> ages;  // most recently used first
  int64_t bytes = 0, hits = 0, misses = 0;
  std::atomic<int64_t> capacity{0};  // read without the lock by calls while the cache is off

  void erase(std::unordered_map<PlanKey, Entry, KeyHash>::iterator it) {
    bytes -= it->second.bytes;
    ages.erase(it->second.age);
    entries.erase(it);
  }
  // Least recently used layers go until the rest fit.
  void fit() {
    while (!ages.empty() && (bytes > capacity || entries.size() > kMaxLayers)) erase(entries.find(ages.back()));
  }
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: calls in other threads may outlive static destruction
  return *c;
}

PlanKey layer_key(const Conv2dDesc& d, const TensorView& w, const TensorView* b,
                  const std::optional<Pool2dDesc>& pool) {
  PlanKey k;
  k.add(static_cast<int64_t>(d.dtype)).add(d.K).add(d.C).add(d.R).add(d.S).add(d.groups);
  k.add(d.stride_h).add(d.stride_w).add(d.pad_top).add(d.pad_bottom).add(d.pad_left).add(d.pad_right);
  k.add(d.dil_h).add(d.dil_w).add(d.has_bias).add(static_cast<int64_t>(d.act)).add(static_cast<int64_t>(active_isa()));
  k.add(static_cast<int64_t>(reinterpret_cast<uintptr_t>(w.data)));
  k.add(b ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(b->data)) : 0);
  if (pool) {
    k.add(pool->kh).add(pool->kw).add(pool->stride_h).add(pool->stride_w).add(pool->pad_h).add(pool->pad_w);
    k.add(pool->dil_h).add(pool->dil_w).add(pool->ceil_mode);
  }
  return k;
}

}  // namespace

template <class T>
std::shared_ptr<const Conv2dLayer<T>> functional_conv_layer(const Conv2dDesc& d, const TensorView& weight,
                                                            const TensorView* bias,
                                                            const std::optional<Pool2dDesc>& pool) {
  Cache& c = cache();
  if (c.capacity.load(std::memory_order_relaxed) == 0 || !weight.is_contiguous() ||
      (bias && !bias->is_contiguous()))
    return nullptr;
  const PlanKey key = layer_key(d, weight, bias, pool);
  std::shared_ptr<const Conv2dLayer<T>> layer;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.capacity == 0) return nullptr;
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      c.ages.splice(c.ages.begin(), c.ages, it->second.age);
      layer = std::static_pointer_cast<const Conv2dLayer<T>>(it->second.layer);
    }
  }
  // Compared without the lock: other calls go on meanwhile.
  const bool hit = layer && layer->holds(weight, bias);
  if (!hit) layer = std::make_shared<const Conv2dLayer<T>>(weight, bias, d, pool);
  std::lock_guard<std::mutex> lock(c.mu);
  ++(hit ? c.hits : c.misses);
  if (!hit && c.capacity > 0) {
    auto it = c.entries.find(key);
    if (it != c.entries.end()) c.erase(it);
    Entry& e = c.entries[key];
    e.layer = layer;
    e.bytes = (weight.numel() + (bias ? bias->numel() : 0)) * static_cast<int64_t>(sizeof(T));
    c.ages.push_front(key);
    e.age = c.ages.begin();
    c.bytes += e.bytes;
    c.fit();
  }
  return layer;  // holds this call's values either way
}

template std::shared_ptr<const Conv2dLayer<float>> functional_conv_layer<float>(const Conv2dDesc&,
                                                                                const TensorView&,
                                                                                const TensorView*,
                                                                                const std::optional<Pool2dDesc>&);
template std::shared_ptr<const Conv2dLayer<double>> functional_conv_layer<double>(const Conv2dDesc&,
                                                                                  const TensorView&,
                                                                                  const TensorView*,
                                                                                  const std::optional<Pool2dDesc>&);

LayerCacheStats layer_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  LayerCacheStats s;
  s.hits = c.hits, s.misses = c.misses, s.bytes = c.bytes, s.capacity = c.capacity;
  s.layers = static_cast<int64_t>(c.entries.size());
  return s;
}

void layer_cache_clear() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
  c.ages.clear();
  c.bytes = c.hits = c.misses = 0;
}

void layer_cache_set_capacity(int64_t bytes) {
  LK_CHECK(bytes >= 0, "nbytes: must be non-negative, got ", bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.capacity = bytes;
  c.fit();
}

}  // namespace lk::cpu
