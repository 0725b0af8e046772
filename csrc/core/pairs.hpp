// Cross-encoder pair assembly: template, truncation (as Hugging Face tokenizers), length-sorted
// batching under a token budget, written into reusable buffers owned by the assembler.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "doc_store.hpp"

namespace tailrank {

/// One element of a pair template: a special token, or sequence A (query) / B (document).
struct TemplatePiece {
  enum Kind : int32_t { kSpecial = 0, kSeqA = 1, kSeqB = 2 };
  Kind kind;
  int64_t token_id;  // for kSpecial
  int32_t type_id;
};

struct PairTemplate {
  std::vector<TemplatePiece> pieces;  // must contain kSeqA and kSeqB exactly once each
  int64_t pad_id = 0;
  size_t n_special() const;
  void validate() const;
};

enum class Truncation { kLongestFirst, kOnlySecond };
/// Which tokens of a cut sequence stay: its starts (Hugging Face's default, truncation_side
/// "right") or its ends ("left"). The counts kept are the same either way (truncate_lengths).
enum class TruncationSide { kRight, kLeft };

/// Where one batch lives in the assembler's buffers.
struct BatchSpec {
  size_t row_start;  // first row in the assembly's row order (see order())
  size_t rows;
  size_t seq_len;    // padded length: the batch's longest pair
  size_t offset;     // element offset of the batch in each buffer
};

/// Memory for the tensors; the default uses aligned heap memory. A CUDA build swaps in pinned
/// host memory through set_allocator.
struct Allocator {
  void* (*alloc)(size_t bytes, void* ctx);
  void (*free)(void* p, void* ctx);
  void* ctx;
};
Allocator default_allocator();

/// A growable, never-shrinking raw buffer.
class Buffer {
 public:
  Buffer() = default;
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void reserve(size_t bytes, const Allocator& a);
  bool uses(const Allocator& a) const { return a.alloc == alloc_.alloc && a.ctx == alloc_.ctx; }
  void release();
  void* data() const { return data_; }
  size_t capacity() const { return capacity_; }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
  Allocator alloc_{};
};

/// Limits on caller-chosen sizes (clear errors instead of allocation failures).
constexpr size_t kMaxPairLength = size_t(1) << 20;
constexpr size_t kMaxBatchTokens = size_t(1) << 30;
constexpr size_t kMaxBatchRows = size_t(1) << 20;
constexpr size_t kMaxPairs = size_t(1) << 24;

struct AssemblerOptions {
  size_t max_length = 512;
  Truncation truncation = Truncation::kLongestFirst;
  size_t batch_tokens = 16384;  // rows x padded length per batch, at most
  size_t max_batch_rows = 256;
  bool int32 = false;           // tensor dtype: int64 (default) or int32
  TruncationSide side = TruncationSide::kRight;  // of every pair, unless assemble_multi says per pair
};

/// Builds cross-encoder batches. One assembly at a time: a second concurrent call throws
/// ConcurrentUseError (use one assembler per thread). The tensor buffers are reference-counted:
/// whoever holds one (an array handed to Python) keeps it alive and unchanged, and an assembly
/// reuses a buffer only when nobody else holds it (otherwise it takes a fresh one). One spare per
/// tensor makes `a = assemble(...)` in a loop (the last result held during the next call)
/// allocation-free too: the two buffers alternate.
class PairAssembler {
 public:
  PairAssembler(PairTemplate tmpl, AssemblerOptions opts);
  ~PairAssembler();

  /// Assembles query `q` against `docs`; returns the batches.
  const std::vector<BatchSpec>& assemble(const int32_t* q, size_t q_len, const std::vector<TokenView>& docs);
  /// Same, with documents from a DocStore (held under its read lock during the copy).
  const std::vector<BatchSpec>& assemble_from_store(const int32_t* q, size_t q_len, const DocStore& store,
                                                    const uint64_t* ids, size_t n);
  /// Pairs with different queries in one assembly: document i is paired with
  /// queries[query_index[i]]. Same truncation, ordering, budget and buffers as assemble();
  /// throws invalid_argument (before any work) when an index is outside [0, queries.size()).
  /// `keep_ends` (null: options().side for every pair) is per pair: nonzero keeps the ends of
  /// its cut query and document (left truncation), zero their starts.
  const std::vector<BatchSpec>& assemble_multi(const std::vector<TokenView>& queries, const int64_t* query_index,
                                               const std::vector<TokenView>& docs,
                                               const uint8_t* keep_ends = nullptr);

  /// order()[r] = candidate index of row r (rows numbered across batches).
  const std::vector<int64_t>& order() const { return order_; }
  /// Per candidate (input order): assembled length with specials, and whether truncation cut it.
  const std::vector<int64_t>& lengths() const { return lengths_; }
  const std::vector<uint8_t>& truncated() const { return truncated_; }
  const std::vector<BatchSpec>& batches() const { return batches_; }
  /// The buffers of the last assembly (null before the first one that needed memory).
  const std::shared_ptr<Buffer>& input_ids() const { return ids_; }
  const std::shared_ptr<Buffer>& attention_mask() const { return mask_; }
  const std::shared_ptr<Buffer>& token_type_ids() const { return types_; }
  /// Whether an assembly is running now (its buffers must not be handed out).
  bool busy() const { return busy_.load(); }
  size_t total_elements() const { return total_elements_; }
  size_t element_size() const { return opts_.int32 ? 4 : 8; }
  size_t buffer_bytes() const;
  const AssemblerOptions& options() const { return opts_; }
  const PairTemplate& pair_template() const { return tmpl_; }
  /// Replaces the memory source (e.g. pinned host memory); drops the current buffers (each is
  /// freed, by the allocator that made it, once nobody holds it).
  void set_allocator(const Allocator& a);

  /// Token counts kept of (query, document) under the truncation rule; throws invalid_argument
  /// where Hugging Face tokenizers would refuse (only_second with a query that leaves no room).
  std::pair<size_t, size_t> truncate_lengths(size_t q_len, size_t d_len) const;

 private:
  /// Candidate i pairs queries[query_index[i]], or queries[0] for every candidate when
  /// query_index is null; keeps the ends of its cut sequences where keep_ends[i] (null: the side option).
  const std::vector<BatchSpec>& run(const std::vector<TokenView>& queries, const int64_t* query_index,
                                    const std::vector<TokenView>& docs, const uint8_t* keep_ends);
  template <class T>
  void fill(const std::vector<TokenView>& queries, const int64_t* query_index, const std::vector<TokenView>& docs,
            const uint8_t* keep_ends);

  PairTemplate tmpl_;
  AssemblerOptions opts_;
  Allocator alloc_;
  std::shared_ptr<Buffer> ids_, mask_, types_;
  std::shared_ptr<Buffer> spare_ids_, spare_mask_, spare_types_;  // the previous assembly's, maybe still held
  std::vector<BatchSpec> batches_;
  std::vector<int64_t> order_, lengths_;
  std::vector<uint8_t> truncated_;
  std::vector<size_t> keep_q_, keep_d_;  // tokens kept per candidate (reused across calls)
  std::vector<TokenView> scratch_docs_, scratch_query_;
  size_t total_elements_ = 0;
  std::atomic<bool> busy_{false};
};

}  // namespace tailrank
