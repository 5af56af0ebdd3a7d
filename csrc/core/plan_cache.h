// The process-wide plan cache: plans keyed by everything that determines them
// (op, dtype, descriptor, ISA level, threads, scheduler settings), bounded by
// a least-recently-used policy. Plans hold no caller data, so a cached plan
// can never be stale; weights are bound per run or packed by modules.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <memory>

namespace lk {

struct PlanKey {
  static constexpr int kMax = 40;
  std::array<int64_t, kMax> v{};
  int n = 0;

  PlanKey& add(int64_t x);
  bool operator==(const PlanKey& o) const { return n == o.n && v == o.v; }
  size_t hash() const;
};

struct PlanCacheStats {
  int64_t hits = 0, misses = 0, evictions = 0;
  int64_t size = 0, capacity = 0;
  int64_t create_ns = 0;  // total time spent creating plans
};

// Returns the cached plan for key, or makes one with make() and caches it.
std::shared_ptr<const void> cached_plan(const PlanKey& key, const std::function<std::shared_ptr<const void>()>& make);

template <class Plan>
std::shared_ptr<const Plan> cached(const PlanKey& key, const std::function<std::shared_ptr<const Plan>()>& make) {
  return std::static_pointer_cast<const Plan>(cached_plan(key, [&] { return std::shared_ptr<const void>(make()); }));
}

PlanCacheStats plan_cache_stats();
// Plans their owners keep instead (a network's, holding its packed weights,
// one per input shape) count in the same hits, misses and creation time.
void plan_cache_count_kept(bool hit, int64_t create_ns = 0);
void plan_cache_clear();
void plan_cache_set_capacity(int64_t capacity);

}  // namespace lk
