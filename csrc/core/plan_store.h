// Measured plan choices kept on disk (LEPTON_CACHE_DIR), so autotuning is
// paid once per machine. One file per library version and processor model:
// a new version or another CPU never reads an old file.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "core/plan_cache.h"

namespace lk {

std::optional<std::vector<int64_t>> stored_choice(const PlanKey& key);
void store_choice(const PlanKey& key, const std::vector<int64_t>& values);

// The file in use, or "" when no cache directory is set.
std::string plan_store_path();

}  // namespace lk
