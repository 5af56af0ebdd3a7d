#include "core/plan_cache.h"

#include <atomic>
#include <chrono>
#include <list>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace lk {

PlanKey& PlanKey::add(int64_t x) {
  if (n == kMax) throw std::logic_error("PlanKey: too many fields");
  v[n++] = x;
  return *this;
}

size_t PlanKey::hash() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
  for (int i = 0; i < n; ++i) {
    h ^= static_cast<uint64_t>(v[i]);
    h *= 1099511628211ull;
  }
  return static_cast<size_t>(h ^ (h >> 29));
}

namespace {

struct KeyHash {
  size_t operator()(const PlanKey& k) const { return k.hash(); }
};

class Cache {
 public:
  std::shared_ptr<const void> get(const PlanKey& key, const std::function<std::shared_ptr<const void>()>& make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second);
        ++stats_.hits;
        return it->second->second;
      }
      ++stats_.misses;
    }
    // Made outside the lock: plans for other keys need not wait. Two threads
    // missing on one key both make it; the second insert finds the first.
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<const void> plan = make();
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.create_ns += ns.count();
    auto it = map_.find(key);
    if (it != map_.end()) return it->second->second;
    if (stats_.capacity == 0) return plan;
    lru_.emplace_front(key, plan);
    map_.emplace(key, lru_.begin());
    evict();
    return plan;
  }

  PlanCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    PlanCacheStats s = stats_;
    s.size = static_cast<int64_t>(map_.size());
    s.hits += kept_hits_.load(std::memory_order_relaxed);
    s.misses += kept_misses_.load(std::memory_order_relaxed);
    s.create_ns += kept_ns_.load(std::memory_order_relaxed);
    return s;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
    lru_.clear();
    stats_ = PlanCacheStats{0, 0, 0, 0, stats_.capacity, 0};
    kept_hits_ = 0, kept_misses_ = 0, kept_ns_ = 0;
  }

  // Atomics, not the lock: a network counts every call.
  void count_kept(bool hit, int64_t create_ns) {
    (hit ? kept_hits_ : kept_misses_).fetch_add(1, std::memory_order_relaxed);
    if (create_ns) kept_ns_.fetch_add(create_ns, std::memory_order_relaxed);
  }

  void set_capacity(int64_t capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.capacity = capacity;
    evict();
  }

 private:
  void evict() {
    while (static_cast<int64_t>(map_.size()) > stats_.capacity) {
      map_.erase(lru_.back().first);
      lru_.pop_back();
      ++stats_.evictions;
    }
  }

  using Entry = std::pair<PlanKey, std::shared_ptr<const void>>;
  std::mutex mu_;
  std::list<Entry> lru_;
  std::unordered_map<PlanKey, std::list<Entry>::iterator, KeyHash> map_;
  PlanCacheStats stats_{0, 0, 0, 0, 512, 0};
  std::atomic<int64_t> kept_hits_{0}, kept_misses_{0}, kept_ns_{0};
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: plans may outlive static destruction order
  return *c;
}

}  // namespace

std::shared_ptr<const void> cached_plan(const PlanKey& key, const std::function<std::shared_ptr<const void>()>& make) {
  return cache().get(key, make);
}

PlanCacheStats plan_cache_stats() { return cache().stats(); }
void plan_cache_count_kept(bool hit, int64_t create_ns) { cache().count_kept(hit, create_ns); }
void plan_cache_clear() { cache().clear(); }
void plan_cache_set_capacity(int64_t capacity) {
  if (capacity < 0) throw std::invalid_argument("capacity: must be non-negative");
  cache().set_capacity(capacity);
}

}  // namespace lk
