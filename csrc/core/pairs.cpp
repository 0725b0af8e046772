#include "pairs.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>

namespace tailrank {

namespace {
void* aligned_alloc64(size_t bytes, void*) {
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!p) throw std::bad_alloc();
  return p;
}
void aligned_free(void* p, void*) { std::free(p); }

struct BusyGuard {
  std::atomic<bool>& flag;
  explicit BusyGuard(std::atomic<bool>& f) : flag(f) {
    if (flag.exchange(true))
      throw ConcurrentUseError("this PairAssembler is in use by another thread; use one assembler per thread");
  }
  ~BusyGuard() { flag.store(false); }
};
}  // namespace

Allocator default_allocator() { return Allocator{aligned_alloc64, aligned_free, nullptr}; }

Buffer::~Buffer() { release(); }

void Buffer::release() {
  if (data_) alloc_.free(data_, alloc_.ctx);
  data_ = nullptr;
  capacity_ = 0;
}

void Buffer::reserve(size_t bytes, const Allocator& a) {
  if (bytes <= capacity_ && a.alloc == alloc_.alloc && a.ctx == alloc_.ctx) return;
  size_t want = std::max(bytes, capacity_ + capacity_ / 2);
  void* p = a.alloc(want, a.ctx);  // may throw; the old buffer stays valid
  release();
  data_ = p;
  capacity_ = want;
  alloc_ = a;
}

size_t PairTemplate::n_special() const {
  size_t n = 0;
  for (const auto& p : pieces) n += p.kind == TemplatePiece::kSpecial;
  return n;
}

void PairTemplate::validate() const {
  int a = 0, b = 0;
  for (const auto& p : pieces) {
    a += p.kind == TemplatePiece::kSeqA;
    b += p.kind == TemplatePiece::kSeqB;
    if (p.kind == TemplatePiece::kSpecial && p.token_id < 0)
      throw std::invalid_argument("special token ids must be >= 0");
  }
  if (a != 1 || b != 1) throw std::invalid_argument("a pair template needs sequence A and sequence B exactly once each");
}

PairAssembler::PairAssembler(PairTemplate tmpl, AssemblerOptions opts)
    : tmpl_(std::move(tmpl)), opts_(opts), alloc_(default_allocator()) {
  tmpl_.validate();
  if (opts_.max_length <= tmpl_.n_special())
    throw std::invalid_argument("max_length (" + std::to_string(opts_.max_length) +
                                ") must exceed the template's special tokens (" + std::to_string(tmpl_.n_special()) + ")");
  if (opts_.batch_tokens < opts_.max_length)
    throw std::invalid_argument("batch_tokens (" + std::to_string(opts_.batch_tokens) + ") must be >= max_length (" +
                                std::to_string(opts_.max_length) + ") so that any pair fits a batch");
  if (opts_.max_batch_rows == 0) throw std::invalid_argument("max_batch_size must be >= 1");
  if (opts_.max_length > kMaxPairLength)
    throw std::invalid_argument("max_length must be at most " + std::to_string(kMaxPairLength) + ", got " +
                                std::to_string(opts_.max_length));
  if (opts_.batch_tokens > kMaxBatchTokens)
    throw std::invalid_argument("batch_tokens must be at most " + std::to_string(kMaxBatchTokens) +
                                " (one batch's tensors are allocated whole), got " + std::to_string(opts_.batch_tokens));
  if (opts_.max_batch_rows > kMaxBatchRows)
    throw std::invalid_argument("max_batch_size must be at most " + std::to_string(kMaxBatchRows) + ", got " +
                                std::to_string(opts_.max_batch_rows));
}

PairAssembler::~PairAssembler() = default;

size_t PairAssembler::buffer_bytes() const {
  size_t n = 0;
  for (const auto* b : {&ids_, &mask_, &types_, &spare_ids_, &spare_mask_, &spare_types_})
    if (*b) n += (*b)->capacity();
  return n;
}

namespace {
bool ours_alone(const std::shared_ptr<Buffer>& b, const Allocator& a) { return b && b.use_count() == 1 && b->uses(a); }

/// Makes `buf` a buffer of at least `bytes` that nobody else holds: `buf` itself or the spare when
/// either is ours alone and from `a`, fresh otherwise. The one given up becomes the spare (it lives
/// on with whoever holds it, and is reused once they let it go).
void own_buffer(std::shared_ptr<Buffer>& buf, std::shared_ptr<Buffer>& spare, size_t bytes, const Allocator& a) {
  if (ours_alone(buf, a)) {
    buf->reserve(bytes, a);
    return;
  }
  if (ours_alone(spare, a)) {
    spare->reserve(bytes, a);  // may throw: both stay as they were
    std::swap(buf, spare);
    return;
  }
  auto fresh = std::make_shared<Buffer>();
  fresh->reserve(bytes, a);
  spare = std::move(buf);
  buf = std::move(fresh);
}
}  // namespace

void PairAssembler::set_allocator(const Allocator& a) {
  BusyGuard g(busy_);
  for (auto* b : {&ids_, &mask_, &types_, &spare_ids_, &spare_mask_, &spare_types_}) b->reset();
  alloc_ = a;
}

std::pair<size_t, size_t> PairAssembler::truncate_lengths(size_t n1, size_t n2) const {
  // Mirrors tokenizers' truncate_encodings with max_length reduced by the added special tokens.
  size_t max_len = opts_.max_length - tmpl_.n_special();
  if (n1 + n2 <= max_len) return {n1, n2};
  if (opts_.truncation == Truncation::kOnlySecond) {
    size_t to_remove = n1 + n2 - max_len;
    if (n2 > to_remove) return {n1, n2 - to_remove};
    throw std::invalid_argument("query of " + std::to_string(n1) + " tokens leaves no room for the document at max_length " +
                                std::to_string(opts_.max_length) + " with truncation only_second; use longest_first");
  }
  bool swap = n1 > n2;
  size_t a = swap ? n2 : n1, b = swap ? n1 : n2;  // a: the shorter
  if (a > max_len)
    b = a;
  else
    b = std::max(a, max_len - a);
  if (a + b > max_len) {
    a = max_len / 2;
    b = a + max_len % 2;
  }
  if (swap) std::swap(a, b);
  return {std::min(a, n1), std::min(b, n2)};
}

namespace {
TokenView query_view(const int32_t* q, size_t q_len) {
  TokenView v;
  v.i32 = q;
  v.size = q_len;
  return v;
}
}  // namespace

const std::vector<BatchSpec>& PairAssembler::assemble(const int32_t* q, size_t q_len,
                                                      const std::vector<TokenView>& docs) {
  BusyGuard g(busy_);
  scratch_query_.assign(1, query_view(q, q_len));
  return run(scratch_query_, nullptr, docs, nullptr);
}

const std::vector<BatchSpec>& PairAssembler::assemble_from_store(const int32_t* q, size_t q_len, const DocStore& store,
                                                                 const uint64_t* ids, size_t n) {
  BusyGuard g(busy_);
  auto lk = store.read_lock();
  scratch_docs_.clear();
  scratch_docs_.reserve(n);
  for (size_t i = 0; i < n; ++i) scratch_docs_.push_back(store.view_locked(ids[i]));
  scratch_query_.assign(1, query_view(q, q_len));
  return run(scratch_query_, nullptr, scratch_docs_, nullptr);
}

const std::vector<BatchSpec>& PairAssembler::assemble_multi(const std::vector<TokenView>& queries,
                                                            const int64_t* query_index,
                                                            const std::vector<TokenView>& docs,
                                                            const uint8_t* keep_ends) {
  BusyGuard g(busy_);
  const size_t n = docs.size();
  for (size_t i = 0; i < n; ++i) {
    if (query_index[i] < 0 || size_t(query_index[i]) >= queries.size())
      throw std::invalid_argument("query_index[" + std::to_string(i) + "] is " + std::to_string(query_index[i]) +
                                  "; it must be in [0, " + std::to_string(queries.size()) + ") (one entry per query)");
  }
  return run(queries, query_index, docs, keep_ends);
}

const std::vector<BatchSpec>& PairAssembler::run(const std::vector<TokenView>& queries, const int64_t* query_index,
                                                 const std::vector<TokenView>& docs, const uint8_t* keep_ends) {
  const size_t n = docs.size();
  if (n > kMaxPairs)
    throw std::invalid_argument(std::to_string(n) + " pairs in one assembly; at most " + std::to_string(kMaxPairs) +
                                " (assemble in parts)");
  const size_t n_special = tmpl_.n_special();
  keep_q_.resize(n);
  keep_d_.resize(n);
  lengths_.resize(n);
  truncated_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    size_t q_len = queries[query_index ? size_t(query_index[i]) : 0].size;
    auto kept = truncate_lengths(q_len, docs[i].size);
    keep_q_[i] = kept.first;
    keep_d_[i] = kept.second;
    lengths_[i] = int64_t(kept.first + kept.second + n_special);
    truncated_[i] = kept.first < q_len || kept.second < docs[i].size;
  }
  // Longest first, ties in input order: each batch pads only to its own first row.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return lengths_[a] > lengths_[b]; });
  batches_.clear();
  total_elements_ = 0;
  for (size_t r = 0; r < n;) {
    size_t seq = size_t(lengths_[order_[r]]);  // 0 for an empty pair under a template without specials
    size_t fit = seq == 0 ? opts_.max_batch_rows : std::max<size_t>(1, opts_.batch_tokens / seq);
    size_t rows = std::min({n - r, opts_.max_batch_rows, fit});
    batches_.push_back(BatchSpec{r, rows, seq, total_elements_});
    total_elements_ += rows * seq;
    r += rows;
  }
  size_t bytes = total_elements_ * element_size();
  own_buffer(ids_, spare_ids_, bytes, alloc_);
  own_buffer(mask_, spare_mask_, bytes, alloc_);
  own_buffer(types_, spare_types_, bytes, alloc_);
  if (opts_.int32)
    fill<int32_t>(queries, query_index, docs, keep_ends);
  else
    fill<int64_t>(queries, query_index, docs, keep_ends);
  return batches_;
}

namespace {
/// Copies `keep` tokens of `v`: its first ones, or with `ends` its last ones.
template <class T>
void copy_tokens(const TokenView& v, size_t keep, bool ends, T* out) {
  size_t from = ends ? v.size - keep : 0;
  if (v.u16)
    for (size_t i = 0; i < keep; ++i) out[i] = T(v.u16[from + i]);
  else
    for (size_t i = 0; i < keep; ++i) out[i] = T(v.i32[from + i]);
}
}  // namespace

template <class T>
void PairAssembler::fill(const std::vector<TokenView>& queries, const int64_t* query_index,
                         const std::vector<TokenView>& docs, const uint8_t* keep_ends) {
  const bool side_ends = opts_.side == TruncationSide::kLeft;
  T* ids = static_cast<T*>(ids_->data());
  T* mask = static_cast<T*>(mask_->data());
  T* types = static_cast<T*>(types_->data());
  for (const BatchSpec& b : batches_) {
    for (size_t r = 0; r < b.rows; ++r) {
      size_t cand = size_t(order_[b.row_start + r]);
      const TokenView& q = queries[query_index ? size_t(query_index[cand]) : 0];
      const bool ends = keep_ends ? keep_ends[cand] != 0 : side_ends;
      size_t base = b.offset + r * b.seq_len;
      T* out = ids + base;
      T* ty = types + base;
      size_t pos = 0;
      for (const TemplatePiece& p : tmpl_.pieces) {
        if (p.kind == TemplatePiece::kSpecial) {
          out[pos] = T(p.token_id);
          ty[pos++] = T(p.type_id);
        } else {
          bool is_query = p.kind == TemplatePiece::kSeqA;
          size_t keep = is_query ? keep_q_[cand] : keep_d_[cand];
          copy_tokens(is_query ? q : docs[cand], keep, ends, out + pos);
          std::fill(ty + pos, ty + pos + keep, T(p.type_id));
          pos += keep;
        }
      }
      std::fill(out + pos, out + b.seq_len, T(tmpl_.pad_id));
      std::fill(ty + pos, ty + b.seq_len, T(0));
      std::fill(mask + base, mask + base + pos, T(1));
      std::fill(mask + base + pos, mask + base + b.seq_len, T(0));
    }
  }
}

}  // namespace tailrank
