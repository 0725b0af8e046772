// The fused first stage: HNSW top-N -> gather of pre-tokenized documents -> assembled batches.
#pragma once

#include "doc_store.hpp"
#include "index.hpp"
#include "pairs.hpp"

namespace tailrank {

/// Searches `index` for one query vector, gathers the hits' tokens from `store` and assembles them
/// with `query_ids`. Writes up to params.k ids/scores (id -1 past the hits); returns the hit count.
/// Every hit must be in `store` (UnknownIdError otherwise).
size_t retrieve_and_assemble(const VectorIndex& index, const DocStore& store, PairAssembler& assembler,
                             const float* query_vec, const int32_t* query_ids, size_t q_len,
                             const SearchParams& params, int64_t* out_ids, float* out_scores);

}  // namespace tailrank
