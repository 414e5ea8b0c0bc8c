// A process-wide cache of what the sparse conv kernels derive from a weight's sparsity structure
// alone (its row_ptr and col_idx and a few integers), not from its values: the phase form's plan
// (plan_phases), the output-channel pairs (plan_pairs) and the pooled form's col_idx
// (pooled_col_idx) in csrc/cpu/sparse_conv2d_kernels.h. A
// training run calls each layer's kernels thousands of times with one structure and new values;
// made anew on every call, those plans took about 2 % of the generator's forward (1 thread,
// 512x512). An entry keeps a copy of the structure it was made from and is returned only for an
// equal structure, compared in full on every lookup (far cheaper than making the plan), so a plan
// never outlives the structure it describes, wherever that structure's tensors live.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace oes_fast {

// What a kernel keeps in the cache (each kind of plan derives from this).
struct StructurePlan {
  virtual ~StructurePlan() = default;
  int64_t bytes = 0;  // the plan's size, for the cache's bound
};

// The structure a plan is made from: `kind` (which plan, of which kernel copy), `ints` (the plan's
// other arguments), the `rows` + 1 row_ptr values and the taps col_idx[row_ptr[0] .. row_ptr[rows]).
struct StructureKey {
  int64_t kind;
  std::vector<int64_t> ints;
  const int64_t* row_ptr;
  int64_t rows;
  const int32_t* col_idx;
};

// The plan kept for an equal structure, or nullptr.
std::shared_ptr<const StructurePlan> find_structure_plan(const StructureKey& key);
// Keeps `plan` for the structure (the least recently used plans go past kStructureCacheBytes).
void keep_structure_plan(const StructureKey& key, std::shared_ptr<const StructurePlan> plan);

// The Plan kept for the key's structure, or make()'s (a std::shared_ptr<Plan>), then kept.
template <typename Plan, typename Make>
std::shared_ptr<const Plan> cached_plan(const StructureKey& key, Make&& make) {
  if (auto kept = find_structure_plan(key)) return std::static_pointer_cast<const Plan>(kept);
  std::shared_ptr<const Plan> made = make();
  keep_structure_plan(key, made);
  return made;
}

}  // namespace oes_fast
