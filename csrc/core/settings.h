// Scheduler settings the user controls: the balance between speed and
// memory, and opt-in autotuning. They are part of every plan's cache key.
#pragma once
#include <cstdint>

namespace lk {

struct SchedulerSettings {
  int64_t memory_budget = INT64_MAX;  // workspace bytes a plan may use
  double memory_weight = 1e-12;       // lambda: seconds of predicted time one workspace byte costs
  bool autotune = false;              // measure the best candidates once on first use
};

SchedulerSettings scheduler_settings();
void set_scheduler_settings(const SchedulerSettings& s);

}  // namespace lk
