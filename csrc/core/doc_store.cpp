#include "doc_store.hpp"

#include <algorithm>
#include <cstring>

namespace tailrank {

namespace {
constexpr uint32_t kDocStoreVersion = 1;
constexpr size_t kMaxDocTokens = 0xFFFFFFFFu;
constexpr uint64_t kMaxDocId = (uint64_t{1} << 63) - 1;  // ids travel as int64 to Python

template <class T>
void put(std::vector<char>& out, const T& v) {
  const char* p = reinterpret_cast<const char*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

}  // namespace

DocStore::DocStore(size_t vocab_size) : vocab_size_(vocab_size), wide_(vocab_size > 65536) {
  if (vocab_size == 0 || vocab_size > size_t(INT32_MAX))
    throw std::invalid_argument("vocab_size must be in [1, 2**31-1], got " + std::to_string(vocab_size));
}

void DocStore::add(const uint64_t* ids, size_t n, const int64_t* flat, size_t flat_size, const int64_t* offsets) {
  if (offsets[0] != 0) throw std::invalid_argument("offsets[0] must be 0");
  for (size_t i = 0; i < n; ++i)
    if (ids[i] > kMaxDocId) throw std::invalid_argument("ids must be in [0, 2**63-1]; got " + std::to_string(ids[i]));
  for (size_t i = 0; i < n; ++i) {
    if (offsets[i + 1] < offsets[i])
      throw std::invalid_argument("offsets must be non-decreasing (offsets[" + std::to_string(i + 1) + "] < offsets[" +
                                  std::to_string(i) + "])");
    if (size_t(offsets[i + 1] - offsets[i]) > kMaxDocTokens)
      throw std::invalid_argument("document " + std::to_string(i) + " has more than 2**32-1 tokens");
  }
  if (size_t(offsets[n]) != flat_size)
    throw std::invalid_argument("offsets[-1] (" + std::to_string(offsets[n]) + ") must equal the number of tokens (" +
                                std::to_string(flat_size) + ")");
  for (size_t i = 0; i < flat_size; ++i)
    if (flat[i] < 0 || uint64_t(flat[i]) >= vocab_size_)
      throw std::invalid_argument("token id " + std::to_string(flat[i]) + " at position " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(vocab_size_) + ")");
  std::unique_lock<RwLock> lk(mu_);
  for (size_t i = 0; i < n; ++i) append_locked(ids[i], flat + offsets[i], size_t(offsets[i + 1] - offsets[i]));
  size_t total = arena_tokens_unlocked();
  if (total > (1u << 20) && total > 2 * live_tokens_) compact_locked();
}

size_t DocStore::arena_tokens_unlocked() const { return wide_ ? i32_.size() : u16_.size(); }

void DocStore::append_locked(uint64_t id, const int64_t* tokens, size_t n) {
  auto it = spans_.find(id);
  if (it != spans_.end()) live_tokens_ -= it->second.length;
  uint64_t offset = arena_tokens_unlocked();
  if (wide_) {
    for (size_t i = 0; i < n; ++i) i32_.push_back(int32_t(tokens[i]));
  } else {
    for (size_t i = 0; i < n; ++i) u16_.push_back(uint16_t(tokens[i]));
  }
  spans_[id] = Span{offset, uint32_t(n)};
  live_tokens_ += n;
}

void DocStore::compact_locked() {
  std::vector<uint16_t> u16;
  std::vector<int32_t> i32;
  (wide_ ? i32.reserve(live_tokens_) : u16.reserve(live_tokens_));
  for (auto& kv : spans_) {
    Span& s = kv.second;
    uint64_t offset = wide_ ? i32.size() : u16.size();
    if (wide_)
      i32.insert(i32.end(), i32_.begin() + s.offset, i32_.begin() + s.offset + s.length);
    else
      u16.insert(u16.end(), u16_.begin() + s.offset, u16_.begin() + s.offset + s.length);
    s.offset = offset;
  }
  u16_.swap(u16);
  i32_.swap(i32);
}

TokenView DocStore::view_locked(uint64_t id) const {
  auto it = spans_.find(id);
  if (it == spans_.end()) throw UnknownIdError("document id " + std::to_string(id) + " is not in the DocStore");
  TokenView v;
  v.size = it->second.length;
  if (wide_)
    v.i32 = i32_.data() + it->second.offset;
  else
    v.u16 = u16_.data() + it->second.offset;
  return v;
}

std::vector<int32_t> DocStore::get(uint64_t id) const {
  std::shared_lock<RwLock> lk(mu_);
  TokenView v = view_locked(id);
  std::vector<int32_t> out(v.size);
  for (size_t i = 0; i < v.size; ++i) out[i] = v[i];
  return out;
}

void DocStore::remove(const uint64_t* ids, size_t n) {
  std::unique_lock<RwLock> lk(mu_);
  for (size_t i = 0; i < n; ++i)
    if (spans_.find(ids[i]) == spans_.end())
      throw UnknownIdError("document id " + std::to_string(ids[i]) + " is not in the DocStore; nothing was deleted");
  for (size_t i = 0; i < n; ++i) {
    auto it = spans_.find(ids[i]);
    if (it == spans_.end()) continue;  // repeated id
    live_tokens_ -= it->second.length;
    spans_.erase(it);
  }
  size_t total = arena_tokens_unlocked();
  if (total > (1u << 20) && total > 2 * live_tokens_) compact_locked();
}

bool DocStore::contains(uint64_t id) const {
  std::shared_lock<RwLock> lk(mu_);
  return spans_.count(id) != 0;
}

size_t DocStore::size() const {
  std::shared_lock<RwLock> lk(mu_);
  return spans_.size();
}

size_t DocStore::arena_tokens() const {
  std::shared_lock<RwLock> lk(mu_);
  return arena_tokens_unlocked();
}

std::vector<uint64_t> DocStore::ids() const {
  std::shared_lock<RwLock> lk(mu_);
  std::vector<uint64_t> out;
  out.reserve(spans_.size());
  for (const auto& kv : spans_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

// File (version 1): FileHeader (fields: vocab size, wide, documents, tokens), then documents x
// (u64 id, u32 length) in id order, then every document's tokens in the same order (u16, or i32
// when wide), all little-endian.
void DocStore::save(const std::string& path) const {
  std::shared_lock<RwLock> lk(mu_);
  std::vector<uint64_t> order;
  order.reserve(spans_.size());
  for (const auto& kv : spans_) order.push_back(kv.first);
  std::sort(order.begin(), order.end());
  const size_t width = wide_ ? 4 : 2;
  uint64_t fields[6] = {vocab_size_, wide_ ? 1u : 0u, order.size(), live_tokens_, 0, 0};
  FileWriter w(path, kDocStoreFile, kDocStoreVersion, fields);
  std::vector<char> recs;
  recs.reserve(order.size() * 12);
  for (uint64_t id : order) {
    put(recs, id);
    put(recs, spans_.at(id).length);
  }
  w.write(recs.data(), recs.size());
  for (uint64_t id : order) {
    const Span& s = spans_.at(id);
    const void* src = wide_ ? static_cast<const void*>(i32_.data() + s.offset) : static_cast<const void*>(u16_.data() + s.offset);
    w.write(src, size_t(s.length) * width);
  }
  w.commit();
}

std::unique_ptr<DocStore> DocStore::load(const std::string& path) {
  FileSource src(path);
  return load_from(src);
}

std::unique_ptr<DocStore> DocStore::load_bytes(const void* data, size_t n, const std::string& name) {
  MemorySource src(data, n, name);
  return load_from(src);
}

std::unique_ptr<DocStore> DocStore::load_from(ByteSource& src) {
  PayloadReader r(src, kDocStoreFile, {kDocStoreVersion});
  const FileHeader& h = r.header();
  const uint64_t vocab = h.fields[0], wide = h.fields[1], count = h.fields[2], tokens = h.fields[3];
  if (vocab == 0 || vocab > uint64_t(INT32_MAX)) r.fail("vocab size " + std::to_string(vocab) + " is outside [1, 2**31-1]");
  if (wide != (vocab > 65536 ? 1u : 0u)) r.fail("the width flag " + std::to_string(wide) + " does not fit vocab size " + std::to_string(vocab));
  if (h.fields[4] != 0 || h.fields[5] != 0) r.fail("reserved header fields are not 0");
  const size_t width = wide ? 4 : 2;
  // Sizes before any allocation: records and tokens must fill the payload exactly.
  if (count > r.remaining() / 12 || tokens > (r.remaining() - count * 12) / width ||
      count * 12 + tokens * width != r.remaining())
    r.fail("payload of " + std::to_string(r.remaining()) + " bytes does not hold " + std::to_string(count) +
           " documents of " + std::to_string(tokens) + " tokens");
  auto store = std::make_unique<DocStore>(vocab);
  std::vector<char> recs(count * 12);
  r.read(recs.data(), recs.size(), "the document records");
  uint64_t sum = 0, prev = 0;
  store->spans_.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    uint64_t id;
    uint32_t len;
    std::memcpy(&id, recs.data() + i * 12, 8);
    std::memcpy(&len, recs.data() + i * 12 + 8, 4);
    if (id > kMaxDocId) r.fail("document id " + std::to_string(id) + " exceeds 2**63-1");
    if (i && id <= prev) r.fail("document ids are not strictly ascending at record " + std::to_string(i) + " (id " + std::to_string(id) + ")");
    prev = id;
    store->spans_.emplace(id, Span{sum, len});
    sum += len;
  }
  if (sum != tokens) r.fail("document lengths add up to " + std::to_string(sum) + "; the header says " + std::to_string(tokens) + " tokens");
  if (wide) {
    store->i32_.resize(tokens);
    r.read(store->i32_.data(), tokens * 4, "the tokens");
  } else {
    store->u16_.resize(tokens);
    r.read(store->u16_.data(), tokens * 2, "the tokens");
  }
  r.finish();
  for (size_t i = 0; i < tokens; ++i) {
    int64_t t = wide ? int64_t(store->i32_[i]) : int64_t(store->u16_[i]);
    if (t < 0 || uint64_t(t) >= vocab) r.fail("token " + std::to_string(i) + " is id " + std::to_string(t) + ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  store->live_tokens_ = tokens;
  return store;
}

}  // namespace tailrank
