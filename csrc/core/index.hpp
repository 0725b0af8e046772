// Thread-safe HNSW vector index over hnswlib, with atomic, checksummed persistence.
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common.hpp"

namespace tailrank {

class ByteSource;
class PayloadReader;
struct Preamble;

/// Limits on caller-chosen sizes: results are allocated before a search, so an absurd k or ef
/// must fail with a message, not an allocation failure.
constexpr size_t kMaxK = size_t(1) << 20;
constexpr size_t kMaxEf = size_t(1) << 20;
constexpr size_t kMaxResults = size_t(1) << 28;  // queries x k per call (3 GiB of ids and scores)
constexpr size_t kMaxThreads = 1024;
constexpr size_t kMaxCapacity = 0xFFFFFFFEu;     // hnswlib's element ids are 32-bit, -1 reserved

/// Throws invalid_argument naming the limit when n queries x k, k, ef or threads exceed it.
void check_search_bounds(size_t n, size_t k, size_t ef, size_t threads);

enum class Metric : uint32_t { kCosine = 0, kIp = 1, kL2 = 2 };

/// Parses "cosine" | "ip" | "l2"; throws invalid_argument otherwise.
Metric parse_metric(const std::string& name);
const char* metric_name(Metric m);

/// A sorted id allow-list used inside the HNSW walk.
class AllowList {
 public:
  explicit AllowList(std::vector<uint64_t> ids);
  bool contains(uint64_t id) const;
  const std::vector<uint64_t>& ids() const { return ids_; }

 private:
  std::vector<uint64_t> ids_;
};

struct SearchParams {
  size_t k = 10;
  size_t ef = 0;                   // 0: the index default
  const AllowList* allow = nullptr;  // optional
  size_t threads = 0;              // 0: hardware threads
};

class HnswImpl;

/// HNSW index; all methods are safe to call concurrently (shared lock for search, exclusive for
/// writes, taken in chunks so searches interleave with long adds).
class VectorIndex {
 public:
  VectorIndex(size_t dim, Metric metric, size_t M = 16, size_t ef_construction = 200, size_t capacity = 0);
  ~VectorIndex();
  VectorIndex(const VectorIndex&) = delete;
  VectorIndex& operator=(const VectorIndex&) = delete;

  /// Adds or replaces `n` vectors (row-major [n, dim]) under `ids`.
  void add(const float* vectors, const uint64_t* ids, size_t n, size_t threads = 0);
  /// Marks ids deleted; unknown ids throw UnknownIdError before anything changes.
  void remove(const uint64_t* ids, size_t n);
  /// Searches `n` queries; writes out_ids[n*k] (-1 where missing) and out_scores[n*k].
  void search(const float* queries, size_t n, const SearchParams& params, int64_t* out_ids, float* out_scores) const;
  bool contains(uint64_t id) const;
  size_t size() const;
  size_t capacity() const;
  size_t dim() const { return dim_; }
  Metric metric() const { return metric_; }
  size_t M() const { return M_; }
  size_t ef_construction() const { return ef_construction_; }
  size_t default_ef() const { return default_ef_; }
  void set_default_ef(size_t ef);
  /// Live ids (not deleted), ascending.
  std::vector<uint64_t> ids() const;

  /// Writes the index in the project's own format (see index.cpp), atomically; every write is
  /// checked, and a failure leaves no file at `path`.
  void save(const std::string& path) const;
  /// Loads a file of format version 1 or 2, validating every structural field before use;
  /// CorruptFileError naming the field otherwise. Reads straight into the index's memory.
  static std::unique_ptr<VectorIndex> load(const std::string& path);
  static std::unique_ptr<VectorIndex> load_bytes(const void* data, size_t n, const std::string& name);

  /// Callers that already hold the shared lock (the fused call) use these.
  std::shared_lock<RwLock> read_lock() const { return std::shared_lock<RwLock>(mu_); }
  /// The exclusive lock, as a writer holds it (tests of lock-free accessors).
  std::unique_lock<RwLock> write_lock() const { return std::unique_lock<RwLock>(mu_); }
  void search_locked(const float* query, const SearchParams& params, int64_t* out_ids, float* out_scores) const;

 private:
  static std::unique_ptr<VectorIndex> load_from(ByteSource& src);
  void validate_graph(const PayloadReader& r, const Preamble& p, uint64_t live);
  void ensure_capacity_locked(size_t needed);
  void prepare(const float* in, float* out) const;  // normalizes for cosine

  size_t dim_;
  Metric metric_;
  size_t M_, ef_construction_;
  size_t default_ef_;
  std::unique_ptr<HnswImpl> impl_;
  mutable RwLock mu_;
};

}  // namespace tailrank
