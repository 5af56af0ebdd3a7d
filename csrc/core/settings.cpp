#include "core/settings.h"

#include <mutex>
#include <stdexcept>

namespace lk {

namespace {
std::mutex g_mu;
SchedulerSettings g_settings;
}  // namespace

SchedulerSettings scheduler_settings() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_settings;
}

void set_scheduler_settings(const SchedulerSettings& s) {
  if (s.memory_budget < 0) throw std::invalid_argument("memory_budget: must be non-negative");
  if (!(s.memory_weight >= 0)) throw std::invalid_argument("memory_weight: must be non-negative");
  std::lock_guard<std::mutex> lock(g_mu);
  g_settings = s;
}

}  // namespace lk
