// The cache of plans made from sparsity structures (structure_cache.h).
#include "structure_cache.h"

#include <algorithm>
#include <cstring>
#include <mutex>

namespace oes_fast {
namespace {

// The bound on what the cache holds, its copies of the structures included: the generator's
// plans (forward and backward, float32 and float64) take a few MB.
constexpr int64_t kStructureCacheBytes = int64_t(64) << 20;

struct Entry {
  int64_t kind;
  std::vector<int64_t> ints, row_ptr;
  std::vector<int32_t> col_idx;
  std::shared_ptr<const StructurePlan> plan;
  int64_t bytes;
  uint64_t used;  // the lookup clock when last found or kept
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  int64_t bytes = 0;
  uint64_t clock = 0;
};

Cache& cache() {
  static Cache c;
  return c;
}

int64_t taps_of(const StructureKey& key) { return key.row_ptr[key.rows] - key.row_ptr[0]; }

bool matches(const Entry& e, const StructureKey& key) {
  if (e.kind != key.kind || e.ints != key.ints || int64_t(e.row_ptr.size()) != key.rows + 1 ||
      int64_t(e.col_idx.size()) != taps_of(key))
    return false;
  if (std::memcmp(e.row_ptr.data(), key.row_ptr, e.row_ptr.size() * sizeof(int64_t)) != 0) return false;
  return e.col_idx.empty() ||
         std::memcmp(e.col_idx.data(), key.col_idx + key.row_ptr[0], e.col_idx.size() * sizeof(int32_t)) == 0;
}

}  // namespace

std::shared_ptr<const StructurePlan> find_structure_plan(const StructureKey& key) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  for (Entry& e : c.entries) {
    if (matches(e, key)) {
      e.used = ++c.clock;
      return e.plan;
    }
  }
  return nullptr;
}

void keep_structure_plan(const StructureKey& key, std::shared_ptr<const StructurePlan> plan) {
  Entry e;
  e.kind = key.kind;
  e.ints = key.ints;
  e.row_ptr.assign(key.row_ptr, key.row_ptr + key.rows + 1);
  e.col_idx.assign(key.col_idx + key.row_ptr[0], key.col_idx + key.row_ptr[0] + taps_of(key));
  e.bytes = plan->bytes + int64_t(sizeof(int64_t) * e.row_ptr.size() + sizeof(int32_t) * e.col_idx.size());
  e.plan = std::move(plan);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  for (const Entry& old : c.entries)
    if (matches(old, key)) return;  // (another thread kept it first)
  e.used = ++c.clock;
  c.bytes += e.bytes;
  c.entries.push_back(std::move(e));
  while (c.bytes > kStructureCacheBytes && c.entries.size() > 1) {
    auto lru = std::min_element(c.entries.begin(), c.entries.end(),
                                [](const Entry& a, const Entry& b) { return a.used < b.used; });
    c.bytes -= lru->bytes;
    c.entries.erase(lru);
  }
}

}  // namespace oes_fast
