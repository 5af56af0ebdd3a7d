#include "core/plan_store.h"

#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "core/cpu_features.h"
#include "core/error.h"

#ifndef LK_VERSION
#define LK_VERSION "dev"
#endif

namespace lk {

namespace {

std::string key_text(const PlanKey& k) {
  std::string s;
  for (int i = 0; i < k.n; ++i) {
    if (i) s += ',';
    s += std::to_string(k.v[i]);
  }
  return s;
}

class Store {
 public:
  Store() {
    const char* dir = std::getenv("LEPTON_CACHE_DIR");
    if (dir == nullptr || *dir == '\0') return;
    path_ = cat(dir, "/plans-", LK_VERSION, "-", cpu_signature(), ".txt");
    std::ifstream in(path_);
    std::string line;
    while (std::getline(in, line)) {  // "key:values"; anything malformed is skipped
      const auto colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::vector<int64_t> values;
      std::istringstream vs(line.substr(colon + 1));
      std::string item;
      bool ok = true;
      while (std::getline(vs, item, ',')) {
        char* end = nullptr;
        const long long v = std::strtoll(item.c_str(), &end, 10);
        if (end == item.c_str() || *end != '\0') ok = false;
        values.push_back(v);
      }
      if (ok && !values.empty()) entries_[line.substr(0, colon)] = values;
    }
  }

  std::optional<std::vector<int64_t>> get(const PlanKey& k) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(key_text(k));
    if (it == entries_.end()) return std::nullopt;
    return it->second;
  }

  void put(const PlanKey& k, const std::vector<int64_t>& values) {
    std::lock_guard<std::mutex> lock(mu_);
    const std::string key = key_text(k);
    entries_[key] = values;
    if (path_.empty()) return;
    std::ofstream out(path_, std::ios::app);  // one short line per write; later lines win on load
    out << key << ':';
    for (size_t i = 0; i < values.size(); ++i) out << (i ? "," : "") << values[i];
    out << '\n';
  }

  const std::string& path() const { return path_; }

 private:
  std::mutex mu_;
  std::string path_;
  std::map<std::string, std::vector<int64_t>> entries_;
};

Store& store() {
  static Store* s = new Store();
  return *s;
}

}  // namespace

std::optional<std::vector<int64_t>> stored_choice(const PlanKey& key) { return store().get(key); }
void store_choice(const PlanKey& key, const std::vector<int64_t>& values) { store().put(key, values); }
std::string plan_store_path() { return store().path(); }

}  // namespace lk
