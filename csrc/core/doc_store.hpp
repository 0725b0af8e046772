// Pre-tokenized documents in one compact arena (uint16 when the vocabulary fits, else int32).
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.hpp"

namespace tailrank {

/// A read-only view of one document's token ids in either storage width.
struct TokenView {
  const uint16_t* u16 = nullptr;
  const int32_t* i32 = nullptr;
  size_t size = 0;
  int32_t operator[](size_t i) const { return u16 ? int32_t(u16[i]) : i32[i]; }
};

class DocStore {
 public:
  /// `vocab_size`: every token id must be in [0, vocab_size); uint16 storage when it is <= 65536.
  explicit DocStore(size_t vocab_size);

  /// Adds or replaces documents: doc i is flat[offsets[i] .. offsets[i+1]). Validates everything first.
  void add(const uint64_t* ids, size_t n, const int64_t* flat, size_t flat_size, const int64_t* offsets);
  /// Token ids of one document; UnknownIdError if absent.
  std::vector<int32_t> get(uint64_t id) const;
  /// Removes ids; unknown ids throw UnknownIdError before anything changes.
  void remove(const uint64_t* ids, size_t n);
  bool contains(uint64_t id) const;
  size_t size() const;
  size_t vocab_size() const { return vocab_size_; }
  bool wide() const { return wide_; }
  /// Tokens held, live and garbage (replaced or deleted documents not yet compacted).
  size_t arena_tokens() const;
  std::vector<uint64_t> ids() const;

  /// Writes the store atomically; every write is checked, a failure leaves no file at `path`.
  void save(const std::string& path) const;
  /// Loads a store, validating every field (sizes, ascending unique ids, token ids) before use;
  /// CorruptFileError naming the field otherwise. Reads straight into the store's arena.
  static std::unique_ptr<DocStore> load(const std::string& path);
  static std::unique_ptr<DocStore> load_bytes(const void* data, size_t n, const std::string& name);

  /// For callers holding read_lock(): a view that stays valid while the lock is held.
  std::shared_lock<RwLock> read_lock() const { return std::shared_lock<RwLock>(mu_); }
  TokenView view_locked(uint64_t id) const;

 private:
  struct Span {
    uint64_t offset;
    uint32_t length;
  };
  static std::unique_ptr<DocStore> load_from(ByteSource& src);
  void append_locked(uint64_t id, const int64_t* tokens, size_t n);
  void compact_locked();
  size_t arena_tokens_unlocked() const;

  size_t vocab_size_;
  bool wide_;
  std::vector<uint16_t> u16_;
  std::vector<int32_t> i32_;
  std::unordered_map<uint64_t, Span> spans_;
  size_t live_tokens_ = 0;
  mutable RwLock mu_;
};

}  // namespace tailrank
