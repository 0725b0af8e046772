#include "fused.hpp"

namespace tailrank {

size_t retrieve_and_assemble(const VectorIndex& index, const DocStore& store, PairAssembler& assembler,
                             const float* query_vec, const int32_t* query_ids, size_t q_len,
                             const SearchParams& params, int64_t* out_ids, float* out_scores) {
  {
    auto lk = index.read_lock();
    index.search_locked(query_vec, params, out_ids, out_scores);
  }
  size_t hits = 0;
  while (hits < params.k && out_ids[hits] >= 0) ++hits;
  std::vector<uint64_t> ids(out_ids, out_ids + hits);
  assembler.assemble_from_store(query_ids, q_len, store, ids.data(), ids.size());
  return hits;
}

}  // namespace tailrank
