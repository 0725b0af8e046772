#include "doc_store.hpp"

#include <algorithm>
#include <cstring>

namespace tailrank {

namespace {
constexpr uint32_t kDocStoreVersion = 1;
constexpr size_t kMaxDocTokens = 0xFFFFFFFFu;

template <class T>
void put(std::vector<char>& out, const T& v) {
  const char* p = reinterpret_cast<const char*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

struct Reader {
  const char* p;
  const char* end;
  const std::string& path;
  template <class T>
  T get() {
    if (size_t(end - p) < sizeof(T)) throw CorruptFileError(path + ": payload shorter than its records");
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
};
}  // namespace

DocStore::DocStore(size_t vocab_size) : vocab_size_(vocab_size), wide_(vocab_size > 65536) {
  if (vocab_size == 0 || vocab_size > size_t(INT32_MAX))
    throw std::invalid_argument("vocab_size must be in [1, 2**31-1], got " + std::to_string(vocab_size));
}

void DocStore::add(const uint64_t* ids, size_t n, const int64_t* flat, size_t flat_size, const int64_t* offsets) {
  if (offsets[0] != 0) throw std::invalid_argument("offsets[0] must be 0");
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

void DocStore::save(const std::string& path) const {
  std::shared_lock<RwLock> lk(mu_);
  // Payload: count x (id u64, length u32), then the tokens of each document in id order.
  std::vector<uint64_t> order;
  order.reserve(spans_.size());
  for (const auto& kv : spans_) order.push_back(kv.first);
  std::sort(order.begin(), order.end());
  size_t width = wide_ ? 4 : 2;
  std::vector<char> payload;
  payload.reserve(order.size() * 12 + live_tokens_ * width);
  for (uint64_t id : order) {
    put(payload, id);
    put(payload, spans_.at(id).length);
  }
  for (uint64_t id : order) {
    const Span& s = spans_.at(id);
    const char* src = wide_ ? reinterpret_cast<const char*>(i32_.data() + s.offset)
                            : reinterpret_cast<const char*>(u16_.data() + s.offset);
    payload.insert(payload.end(), src, src + size_t(s.length) * width);
  }
  uint64_t fields[6] = {vocab_size_, wide_ ? 1u : 0u, order.size(), live_tokens_, 0, 0};
  FileHeader hdr = make_header(kDocStoreFile, kDocStoreVersion, fields, payload.data(), payload.size());
  atomic_write(path, {{&hdr, sizeof hdr}, {payload.data(), payload.size()}});
}

std::unique_ptr<DocStore> DocStore::load(const std::string& path) {
  std::vector<char> bytes = read_file(path);
  const FileHeader& h = check_header(bytes, kDocStoreFile, kDocStoreVersion, path);
  uint64_t vocab = h.fields[0], wide = h.fields[1], count = h.fields[2], tokens = h.fields[3];
  if (vocab == 0 || vocab > uint64_t(INT32_MAX) || wide != (vocab > 65536 ? 1u : 0u))
    throw CorruptFileError(path + ": header fields out of range");
  size_t width = wide ? 4 : 2;
  if (count > h.payload_size / 12 || tokens > h.payload_size / width || count * 12 + tokens * width != h.payload_size)
    throw CorruptFileError(path + ": payload size disagrees with its header");
  auto store = std::make_unique<DocStore>(vocab);
  Reader r{bytes.data() + sizeof(FileHeader), bytes.data() + bytes.size(), path};
  std::vector<std::pair<uint64_t, uint32_t>> recs(count);
  uint64_t sum = 0;
  for (auto& rec : recs) {
    rec.first = r.get<uint64_t>();
    rec.second = r.get<uint32_t>();
    sum += rec.second;
  }
  if (sum != tokens) throw CorruptFileError(path + ": document lengths disagree with the token count");
  if (wide) {
    store->i32_.resize(tokens);
    if (tokens) std::memcpy(store->i32_.data(), r.p, tokens * 4);  // data() is null when empty
    for (int32_t t : store->i32_)
      if (t < 0 || uint64_t(t) >= vocab) throw CorruptFileError(path + ": token id outside the vocabulary");
  } else {
    store->u16_.resize(tokens);
    if (tokens) std::memcpy(store->u16_.data(), r.p, tokens * 2);  // data() is null when empty
    for (uint16_t t : store->u16_)
      if (t >= vocab) throw CorruptFileError(path + ": token id outside the vocabulary");
  }
  uint64_t offset = 0;
  store->spans_.reserve(count);
  for (const auto& rec : recs) {
    if (!store->spans_.emplace(rec.first, Span{offset, rec.second}).second)
      throw CorruptFileError(path + ": duplicate document id " + std::to_string(rec.first));
    offset += rec.second;
  }
  store->live_tokens_ = tokens;
  return store;
}

}  // namespace tailrank
