#include "index.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <queue>
#include <random>
#include <unistd.h>
#include <unordered_map>

#include "common.hpp"
#include "distance.hpp"
#include "thread_pool.hpp"
#include "hnswlib/hnswlib.h"

namespace tailrank {

namespace {
constexpr uint32_t kIndexVersion = 2;        // written; version 1 (hnswlib's layout) is still read
constexpr size_t kAddChunk = 1024;           // vectors per exclusive section: searches interleave
constexpr size_t kMinCapacity = 1024;
constexpr uint64_t kMaxId = (uint64_t{1} << 63) - 1;  // ids travel as int64 to Python
constexpr uint64_t kLevelSeed = 100;
constexpr int kMaxLevel = 64;                 // far above any level drawn for M >= 2
constexpr size_t kMaxRound = 256;             // fresh inserts searched in parallel per round
// ip/l2 score in float32: with norms at most 1e18, a dot product or squared distance of two
// vectors stays below (2e18)^2 = 4e36, far from float32's 3.4e38 (no inf or NaN scores).
constexpr double kMaxNorm = 1e18;

/// Whether a finite vector's scores can overflow under `metric` (never for cosine: normalized).
bool norm_too_large(const float* v, size_t dim, Metric metric) {
  if (metric == Metric::kCosine) return false;
  double sq = 0;
  for (size_t j = 0; j < dim; ++j) sq += double(v[j]) * v[j];
  return sq > kMaxNorm * kMaxNorm;
}
using tableint = hnswlib::tableint;
using Hnsw = hnswlib::HierarchicalNSW<float>;
using Candidates = std::priority_queue<std::pair<float, tableint>, std::vector<std::pair<float, tableint>>,
                                       Hnsw::CompareByFirst>;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Space : public hnswlib::SpaceInterface<float> {
 public:
  Space(size_t dim, Metric metric)
      : dim_(dim), fn_(metric == Metric::kL2 ? l2_squared_distance() : inner_product_distance()) {}
  size_t get_data_size() override { return dim_ * sizeof(float); }
  hnswlib::DISTFUNC<float> get_dist_func() override { return fn_; }
  void* get_dist_func_param() override { return &dim_; }

 private:
  size_t dim_;
  DistFn fn_;
};

class AllowFilter : public hnswlib::BaseFilterFunctor {
 public:
  explicit AllowFilter(const AllowList& a) : a_(a) {}
  bool operator()(hnswlib::labeltype id) override { return a_.contains(id); }

 private:
  const AllowList& a_;
};

}  // namespace

class HnswImpl {
 public:
  HnswImpl(size_t dim, Metric metric) : space(dim, metric) {}
  Space space;
  std::unique_ptr<Hnsw> h;
  uint64_t level_seed = kLevelSeed;

  /// The level of the element in slot `slot`: a function of the seed and the slot alone, so a
  /// build does not depend on thread timing (hnswlib's own draw reads a shared generator unlocked).
  int level_of(size_t slot) const {
    uint64_t r = splitmix64(level_seed ^ (uint64_t(slot) * 0xD1B54A32D192ED03ull));
    double u = double((r >> 11) + 1) * 0x1.0p-53;  // (0, 1]
    return std::min(kMaxLevel, int(-std::log(u) * h->mult_));
  }
  /// Upper-level link lists get one spare id: hnswlib's SSE prefetch reads one id past a full list.
  static char* alloc_links(size_t bytes) {
    char* p = static_cast<char*>(std::calloc(1, bytes + sizeof(tableint)));
    if (!p) throw std::bad_alloc();
    return p;
  }

  /// Inserts `n` new labels into empty slots, in rounds: the members of a round search the graph
  /// as it stood before the round in parallel (read-only), then link in input order, each also
  /// considering the round's earlier members. The graph depends on the data and the seed only,
  /// never on the thread count or timing.
  void insert_fresh(const float* const* vecs, const uint64_t* labels, size_t n, size_t threads);

 private:
  using Found = std::vector<std::vector<std::pair<float, tableint>>>;  // per layer, farthest first
  Found neighbours(const float* q, int level, int top, tableint entry) const;
  void connect(size_t base, size_t t, const float* const* vecs, const std::vector<int>& levels, const Found& found);
  float dist(const void* a, const void* b) const { return h->fstdistfunc_(a, b, h->dist_func_param_); }
};

void HnswImpl::insert_fresh(const float* const* vecs, const uint64_t* labels, size_t n, size_t threads) {
  Hnsw& g = *h;
  std::vector<Found> found;
  for (size_t done = 0; done < n;) {
    const size_t base = g.cur_element_count;
    const size_t round = std::min(n - done, std::clamp<size_t>(base / 16, 1, kMaxRound));
    std::vector<int> levels(round);
    std::vector<std::unique_ptr<char, void (*)(void*)>> links;
    links.reserve(round);
    for (size_t t = 0; t < round; ++t) {
      levels[t] = level_of(base + t);
      links.emplace_back(levels[t] ? alloc_links(g.size_links_per_element_ * levels[t]) : nullptr, std::free);
    }
    g.label_lookup_.reserve(g.label_lookup_.size() + round);
    for (size_t t = 0; t < round; ++t) {  // nothing below throws: the round's slots are claimed whole
      size_t slot = base + t;
      std::memset(g.data_level0_memory_ + slot * g.size_data_per_element_, 0, g.size_data_per_element_);
      std::memcpy(g.getExternalLabeLp(tableint(slot)), &labels[done + t], sizeof(uint64_t));
      std::memcpy(g.getDataByInternalId(tableint(slot)), vecs[done + t], g.data_size_);
      g.element_levels_[slot] = levels[t];
      g.linkLists_[slot] = links[t].release();
      g.label_lookup_[labels[done + t]] = tableint(slot);
    }
    g.cur_element_count = base + round;
    const int top = g.maxlevel_;
    const tableint entry = g.enterpoint_node_;
    found.assign(round, {});
    pool_run(round, threads, [&](size_t t) { found[t] = neighbours(vecs[done + t], levels[t], top, entry); });
    for (size_t t = 0; t < round; ++t) connect(base, t, vecs + done, levels, found[t]);
    done += round;
  }
}

HnswImpl::Found HnswImpl::neighbours(const float* q, int level, int top, tableint entry) const {
  Found out(size_t(level) + 1);
  if (top < 0) return out;  // the first element
  Hnsw& g = *h;
  tableint cur = entry;
  float cur_d = dist(q, g.getDataByInternalId(cur));
  for (int l = top; l > level; --l) {
    for (bool changed = true; changed;) {
      changed = false;
      auto* links = g.get_linklist(cur, l);
      auto* nbrs = reinterpret_cast<tableint*>(links + 1);
      for (int i = 0, c = g.getListCount(links); i < c; ++i) {
        float d = dist(q, g.getDataByInternalId(nbrs[i]));
        if (d < cur_d) {
          cur_d = d;
          cur = nbrs[i];
          changed = true;
        }
      }
    }
  }
  for (int l = std::min(level, top); l >= 0; --l) {
    Candidates c = g.searchBaseLayer(cur, q, l);
    auto& v = out[size_t(l)];
    v.reserve(c.size());
    for (; !c.empty(); c.pop()) v.push_back(c.top());
    cur = v.back().second;  // the closest: where the next layer starts
  }
  return out;
}

void HnswImpl::connect(size_t base, size_t t, const float* const* vecs, const std::vector<int>& levels,
                       const Found& found) {
  Hnsw& g = *h;
  const size_t slot = base + t;
  const int level = levels[t];
  for (int l = level; l >= 0; --l) {
    Candidates c;
    for (const auto& p : found[size_t(l)]) c.push(p);
    for (size_t u = 0; u < t; ++u)
      if (levels[u] >= l) c.emplace(dist(vecs[t], vecs[u]), tableint(base + u));
    if (c.empty()) continue;
    while (c.size() > g.ef_construction_) c.pop();
    g.mutuallyConnectNewElement(vecs[t], tableint(slot), c, l, false);
  }
  if (level > g.maxlevel_) {
    g.maxlevel_ = level;
    g.enterpoint_node_ = tableint(slot);
  }
}

void check_search_bounds(size_t n, size_t k, size_t ef, size_t threads) {
  if (k > kMaxK)
    throw std::invalid_argument("k is " + std::to_string(k) + "; at most " + std::to_string(kMaxK) +
                                " (results are allocated before the search)");
  if (ef > kMaxEf)
    throw std::invalid_argument("ef is " + std::to_string(ef) + "; at most " + std::to_string(kMaxEf) +
                                " (the beam is allocated per query)");
  if (k && n > kMaxResults / k)
    throw std::invalid_argument(std::to_string(n) + " queries x k " + std::to_string(k) + " exceeds " +
                                std::to_string(kMaxResults) + " results per call; search in smaller batches");
  if (threads > kMaxThreads)
    throw std::invalid_argument("threads is " + std::to_string(threads) + "; at most " + std::to_string(kMaxThreads));
}

Metric parse_metric(const std::string& name) {
  if (name == "cosine") return Metric::kCosine;
  if (name == "ip") return Metric::kIp;
  if (name == "l2") return Metric::kL2;
  throw std::invalid_argument("metric must be \"cosine\", \"ip\" or \"l2\", got \"" + name + "\"");
}

const char* metric_name(Metric m) {
  switch (m) {
    case Metric::kCosine: return "cosine";
    case Metric::kIp: return "ip";
    default: return "l2";
  }
}

AllowList::AllowList(std::vector<uint64_t> ids) : ids_(std::move(ids)) {
  std::sort(ids_.begin(), ids_.end());
  ids_.erase(std::unique(ids_.begin(), ids_.end()), ids_.end());
}

bool AllowList::contains(uint64_t id) const { return std::binary_search(ids_.begin(), ids_.end(), id); }

VectorIndex::VectorIndex(size_t dim, Metric metric, size_t M, size_t ef_construction, size_t capacity)
    : dim_(dim), metric_(metric), M_(M), ef_construction_(ef_construction), default_ef_(0) {
  if (dim == 0 || dim > 65536) throw std::invalid_argument("dim must be in [1, 65536], got " + std::to_string(dim));
  if (M < 2 || M > 256) throw std::invalid_argument("M must be in [2, 256], got " + std::to_string(M));
  if (ef_construction < 1 || ef_construction > kMaxEf)
    throw std::invalid_argument("ef_construction must be in [1, " + std::to_string(kMaxEf) + "], got " +
                                std::to_string(ef_construction));
  if (capacity > kMaxCapacity)
    throw std::invalid_argument("capacity must be at most " + std::to_string(kMaxCapacity) +
                                " (hnswlib's 32-bit element ids), got " + std::to_string(capacity));
  default_ef_ = std::max<size_t>(64, ef_construction / 2);
  impl_ = std::make_unique<HnswImpl>(dim, metric);
  impl_->h = std::make_unique<hnswlib::HierarchicalNSW<float>>(
      &impl_->space, std::max(capacity, kMinCapacity), M, ef_construction, /*random_seed=*/100,
      /*allow_replace_deleted=*/true);
}

VectorIndex::~VectorIndex() = default;

void VectorIndex::set_default_ef(size_t ef) {
  if (ef < 1 || ef > kMaxEf)
    throw std::invalid_argument("ef must be in [1, " + std::to_string(kMaxEf) + "], got " + std::to_string(ef));
  std::unique_lock<RwLock> lk(mu_);
  default_ef_ = ef;
}

void VectorIndex::prepare(const float* in, float* out) const {
  if (metric_ != Metric::kCosine) {
    std::memcpy(out, in, dim_ * sizeof(float));
    return;
  }
  double norm = 0;
  for (size_t i = 0; i < dim_; ++i) norm += double(in[i]) * in[i];
  // In double: 1 / norm overflows float for norms below ~3e-39 (a NaN or infinite row after).
  double inv = norm > 0 ? 1.0 / std::sqrt(norm) : 0.0;
  for (size_t i = 0; i < dim_; ++i) out[i] = float(double(in[i]) * inv);
}

void VectorIndex::ensure_capacity_locked(size_t needed) {
  auto& h = *impl_->h;
  if (needed <= h.max_elements_) return;
  if (needed > kMaxCapacity)
    throw std::invalid_argument("an index holds at most " + std::to_string(kMaxCapacity) +
                                " vectors (hnswlib's 32-bit element ids); " + std::to_string(needed) + " requested");
  h.resizeIndex(std::min<size_t>(kMaxCapacity, std::max(needed, h.max_elements_ * 2)));
}

void VectorIndex::add(const float* vectors, const uint64_t* ids, size_t n, size_t threads) {
  if (threads > kMaxThreads)
    throw std::invalid_argument("threads is " + std::to_string(threads) + "; at most " + std::to_string(kMaxThreads));
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] > kMaxId) throw std::invalid_argument("ids must be in [0, 2**63-1]; got " + std::to_string(ids[i]));
    for (size_t j = 0; j < dim_; ++j)
      if (!std::isfinite(vectors[i * dim_ + j]))
        throw std::invalid_argument("vector " + std::to_string(i) + " has a NaN or infinite value");
    if (norm_too_large(vectors + i * dim_, dim_, metric_))
      throw std::invalid_argument("vector " + std::to_string(i) + " has a norm above 1e18: its " +
                                  std::string(metric_name(metric_)) + " scores would overflow float32 (scale the vectors down)");
  }
  // Last occurrence of a repeated id wins; hnswlib must never see one label twice in a batch.
  std::unordered_map<uint64_t, size_t> last;
  last.reserve(n);
  for (size_t i = 0; i < n; ++i) last[ids[i]] = i;
  std::vector<size_t> rows;
  rows.reserve(last.size());
  for (size_t i = 0; i < n; ++i)
    if (last[ids[i]] == i) rows.push_back(i);

  std::vector<float> prepared(rows.size() * dim_);
  for (size_t r = 0; r < rows.size(); ++r) prepare(vectors + rows[r] * dim_, prepared.data() + r * dim_);

  for (size_t start = 0; start < rows.size(); start += kAddChunk) {
    size_t end = std::min(rows.size(), start + kAddChunk);
    std::unique_lock<RwLock> lk(mu_);
    auto& h = *impl_->h;
    // Ids already present (live or deleted) go first: a revived id takes its own deleted slot
    // back, so it must leave the vacant set before new ids claim vacant slots (hnswlib's replace
    // assumes nothing else touches a deleted element, and the capacity count depends on it).
    std::vector<size_t> present, fresh;
    for (size_t r = start; r < end; ++r)
      (h.label_lookup_.count(ids[rows[r]]) ? present : fresh).push_back(r);
    // hnswlib's in-place update (used for re-added ids and for reusing a deleted slot) draws from
    // one shared random generator without a lock: those run on this thread; only fresh inserts
    // into empty slots run in parallel.
    for (size_t r : present) {
      uint64_t id = ids[rows[r]];
      if (h.isMarkedDeleted(h.label_lookup_.at(id))) h.unmarkDelete(id);
      h.addPoint(prepared.data() + r * dim_, id, /*replace_deleted=*/false);  // updates in place
    }
    size_t reuse = std::min(fresh.size(), h.deleted_elements.size());
    for (size_t t = 0; t < reuse; ++t)
      h.addPoint(prepared.data() + fresh[t] * dim_, ids[rows[fresh[t]]], /*replace_deleted=*/true);
    size_t n_new = fresh.size() - reuse;
    ensure_capacity_locked(h.cur_element_count + n_new);
    std::vector<const float*> vecs(n_new);
    std::vector<uint64_t> labels(n_new);
    for (size_t t = 0; t < n_new; ++t) {
      vecs[t] = prepared.data() + fresh[reuse + t] * dim_;
      labels[t] = ids[rows[fresh[reuse + t]]];
    }
    impl_->insert_fresh(vecs.data(), labels.data(), n_new, threads);
  }
}

void VectorIndex::remove(const uint64_t* ids, size_t n) {
  std::unique_lock<RwLock> lk(mu_);
  auto& h = *impl_->h;
  for (size_t i = 0; i < n; ++i) {
    auto it = h.label_lookup_.find(ids[i]);
    if (it == h.label_lookup_.end() || h.isMarkedDeleted(it->second))
      throw UnknownIdError("id " + std::to_string(ids[i]) + " is not in the index; nothing was deleted");
  }
  std::vector<uint64_t> uniq(ids, ids + n);
  std::sort(uniq.begin(), uniq.end());
  uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
  for (uint64_t id : uniq) h.markDelete(id);
}

bool VectorIndex::contains(uint64_t id) const {
  std::shared_lock<RwLock> lk(mu_);
  auto& h = *impl_->h;
  auto it = h.label_lookup_.find(id);
  return it != h.label_lookup_.end() && !h.isMarkedDeleted(it->second);
}

size_t VectorIndex::size() const {
  std::shared_lock<RwLock> lk(mu_);
  return impl_->h->cur_element_count - impl_->h->num_deleted_;
}

size_t VectorIndex::capacity() const {
  std::shared_lock<RwLock> lk(mu_);
  return impl_->h->max_elements_;
}

std::vector<uint64_t> VectorIndex::ids() const {
  std::shared_lock<RwLock> lk(mu_);
  auto& h = *impl_->h;
  std::vector<uint64_t> out;
  out.reserve(h.label_lookup_.size());
  for (const auto& kv : h.label_lookup_)
    if (!h.isMarkedDeleted(kv.second)) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

void VectorIndex::search_locked(const float* query, const SearchParams& p, int64_t* out_ids,
                                float* out_scores) const {
  check_search_bounds(1, p.k, p.ef, p.threads);
  const auto& h = *impl_->h;
  for (size_t j = 0; j < dim_; ++j)
    if (!std::isfinite(query[j])) throw std::invalid_argument("queries must be finite: a query has a NaN or infinite value");
  std::vector<float> q(dim_);
  prepare(query, q.data());
  for (size_t j = 0; j < p.k; ++j) {
    out_ids[j] = -1;
    out_scores[j] = metric_ == Metric::kL2 ? INFINITY : -INFINITY;
  }
  auto to_score = [&](float d) { return metric_ == Metric::kL2 ? d : 1.0f - d; };
  size_t live = h.cur_element_count - h.num_deleted_;
  if (p.k == 0 || live == 0) return;

  using Pair = std::pair<float, hnswlib::labeltype>;
  std::vector<Pair> found;
  if (p.allow && p.allow->ids().size() <= std::max<size_t>(4096, live / 50)) {
    // Small allow-lists: exact scan of the allowed vectors (HNSW recall drops on tiny subsets).
    for (uint64_t id : p.allow->ids()) {
      auto it = h.label_lookup_.find(id);
      if (it == h.label_lookup_.end() || h.isMarkedDeleted(it->second)) continue;
      found.emplace_back(h.fstdistfunc_(q.data(), h.getDataByInternalId(it->second), h.dist_func_param_), id);
    }
    size_t keep = std::min(found.size(), p.k);
    std::partial_sort(found.begin(), found.begin() + keep, found.end());
    found.resize(keep);
  } else {
    // Greedy descent through the upper layers, then the base-layer beam with a per-call ef.
    hnswlib::tableint cur = h.enterpoint_node_;
    float cur_d = h.fstdistfunc_(q.data(), h.getDataByInternalId(cur), h.dist_func_param_);
    for (int level = h.maxlevel_; level > 0; --level) {
      bool changed = true;
      while (changed) {
        changed = false;
        auto* links = h.get_linklist(cur, level);
        int count = h.getListCount(links);
        auto* nbrs = reinterpret_cast<hnswlib::tableint*>(links + 1);
        for (int i = 0; i < count; ++i) {
          float d = h.fstdistfunc_(q.data(), h.getDataByInternalId(nbrs[i]), h.dist_func_param_);
          if (d < cur_d) {
            cur_d = d;
            cur = nbrs[i];
            changed = true;
          }
        }
      }
    }
    size_t ef = std::max(p.ef ? p.ef : default_ef_, p.k);
    // The filter refers to the caller's list (no copy, and nothing temporary to dangle).
    std::optional<AllowFilter> filter;
    if (p.allow) filter.emplace(*p.allow);
    hnswlib::BaseFilterFunctor* f = filter ? &*filter : nullptr;
    auto top = (h.num_deleted_ == 0 && !f) ? h.searchBaseLayerST<true>(cur, q.data(), ef, f)
                                           : h.searchBaseLayerST<false>(cur, q.data(), ef, f);
    while (top.size() > p.k) top.pop();
    found.resize(top.size());
    for (size_t i = top.size(); i-- > 0;) {
      found[i] = {top.top().first, h.getExternalLabel(top.top().second)};
      top.pop();
    }
  }
  for (size_t j = 0; j < found.size(); ++j) {
    out_ids[j] = static_cast<int64_t>(found[j].second);
    out_scores[j] = to_score(found[j].first);
  }
}

void VectorIndex::search(const float* queries, size_t n, const SearchParams& p, int64_t* out_ids,
                         float* out_scores) const {
  check_search_bounds(n, p.k, p.ef, p.threads);
  std::shared_lock<RwLock> lk(mu_);
  parallel_for(n, p.threads, [&](size_t i) {
    search_locked(queries + i * dim_, p, out_ids + i * p.k, out_scores + i * p.k);
  });
}

// ---- the index file ---------------------------------------------------------------------------
//
// Our own format (version 2), written from and loaded into hnswlib's public data structures, so
// the loader checks every field before any of it is used (hnswlib's own loadIndex trusts its
// input, and a file with a recomputed checksum could crash it). After the 80-byte FileHeader
// (fields: dim, metric, live count, M, ef_construction, default ef), the payload holds, all
// little-endian:
//   preamble  8 x u64: slots (elements, deleted included), capacity, maxM0 (= 2M), maxM (= M),
//             max level (int64, -1 when empty), entry point slot, deleted count, level seed
//   level 0   slots x (u32 link header: bits 0-15 neighbour count <= maxM0, bit 16 deleted mark,
//             other bits 0; maxM0 x u32 neighbour slots; dim x f32 vector, unit length for cosine;
//             u64 label)
//   levels    slots x u32: each element's top level
//   upper     for each element with level L > 0, in slot order: L x (u32 count <= maxM; maxM x u32)
// Version 1 (round 1: hnswlib's saveIndex layout after the same header) is still read, through
// the same validation, and saved as version 2.

struct Preamble {
  uint64_t slots = 0, capacity = 0;
  int64_t max_level = -1;
  uint64_t entry = 0, deleted = 0, seed = kLevelSeed;
  bool has_deleted_count = false;
};

namespace {

struct Layout {
  size_t dim, M, maxM0, sdpe, sle;
  explicit Layout(size_t d, size_t m)
      : dim(d), M(m), maxM0(2 * m), sdpe(4 + 4 * 2 * m + 4 * d + 8), sle(4 + 4 * m) {}
};

Preamble read_preamble_v2(PayloadReader& r, const Layout& lay) {
  Preamble p;
  p.slots = r.get<uint64_t>("the element count");
  p.capacity = r.get<uint64_t>("the capacity");
  uint64_t maxM0 = r.get<uint64_t>("maxM0"), maxM = r.get<uint64_t>("maxM");
  p.max_level = r.get<int64_t>("the max level");
  p.entry = r.get<uint64_t>("the entry point");
  p.deleted = r.get<uint64_t>("the deleted count");
  p.seed = r.get<uint64_t>("the level seed");
  p.has_deleted_count = true;
  if (maxM0 != lay.maxM0) r.fail("maxM0 is " + std::to_string(maxM0) + "; M " + std::to_string(lay.M) + " needs " + std::to_string(lay.maxM0));
  if (maxM != lay.M) r.fail("maxM is " + std::to_string(maxM) + "; the header's M is " + std::to_string(lay.M));
  return p;
}

Preamble read_preamble_v1(PayloadReader& r, const Layout& lay, size_t ef_construction) {
  Preamble p;
  uint64_t offset_level0 = r.get<uint64_t>("offsetLevel0");
  p.capacity = r.get<uint64_t>("max_elements");
  p.slots = r.get<uint64_t>("the element count");
  uint64_t sdpe = r.get<uint64_t>("size_data_per_element");
  uint64_t label_offset = r.get<uint64_t>("label_offset");
  uint64_t offset_data = r.get<uint64_t>("offsetData");
  p.max_level = r.get<int32_t>("the max level");
  p.entry = r.get<uint32_t>("the entry point");
  uint64_t maxM = r.get<uint64_t>("maxM"), maxM0 = r.get<uint64_t>("maxM0"), M = r.get<uint64_t>("M");
  (void)r.get<double>("mult");  // recomputed from M
  uint64_t efc = r.get<uint64_t>("ef_construction");
  if (offset_level0 != 0) r.fail("offsetLevel0 must be 0");
  if (sdpe != lay.sdpe || offset_data != 4 + 4 * lay.maxM0 || label_offset != 4 + 4 * lay.maxM0 + 4 * lay.dim)
    r.fail("element layout (size " + std::to_string(sdpe) + ", data at " + std::to_string(offset_data) +
           ", label at " + std::to_string(label_offset) + ") disagrees with dim " + std::to_string(lay.dim) +
           " and M " + std::to_string(lay.M));
  if (M != lay.M || maxM != lay.M || maxM0 != lay.maxM0) r.fail("M, maxM or maxM0 disagree with the header's M");
  if (efc != std::max(ef_construction, lay.M)) r.fail("ef_construction disagrees with the header");
  return p;
}

}  // namespace

void VectorIndex::save(const std::string& path) const {
  std::shared_lock<RwLock> lk(mu_);
  const Hnsw& h = *impl_->h;
  const size_t slots = h.cur_element_count;
  uint64_t fields[6] = {dim_, static_cast<uint64_t>(metric_), slots - h.num_deleted_, M_, ef_construction_, default_ef_};
  FileWriter w(path, kIndexFile, kIndexVersion, fields);
  w.put<uint64_t>(slots);
  w.put<uint64_t>(h.max_elements_);
  w.put<uint64_t>(h.maxM0_);
  w.put<uint64_t>(h.maxM_);
  w.put<int64_t>(slots ? h.maxlevel_ : -1);
  w.put<uint64_t>(slots ? h.enterpoint_node_ : 0);
  w.put<uint64_t>(h.num_deleted_);
  w.put<uint64_t>(impl_->level_seed);
  w.write(h.data_level0_memory_, slots * h.size_data_per_element_);
  std::vector<uint32_t> levels(h.element_levels_.begin(), h.element_levels_.begin() + slots);
  w.write(levels.data(), levels.size() * sizeof(uint32_t));
  for (size_t i = 0; i < slots; ++i)
    if (levels[i] > 0) w.write(h.linkLists_[i], h.size_links_per_element_ * levels[i]);
  w.commit();
}

std::unique_ptr<VectorIndex> VectorIndex::load(const std::string& path) {
  FileSource src(path);
  return load_from(src);
}

std::unique_ptr<VectorIndex> VectorIndex::load_bytes(const void* data, size_t n, const std::string& name) {
  MemorySource src(data, n, name);
  return load_from(src);
}

std::unique_ptr<VectorIndex> VectorIndex::load_from(ByteSource& src) {
  PayloadReader r(src, kIndexFile, {1, kIndexVersion});
  const FileHeader& hdr = r.header();
  const uint64_t dim = hdr.fields[0], metric = hdr.fields[1], live = hdr.fields[2], M = hdr.fields[3],
                 efc = hdr.fields[4], def_ef = hdr.fields[5];
  if (dim == 0 || dim > 65536) r.fail("dim " + std::to_string(dim) + " is outside [1, 65536]");
  if (metric > 2) r.fail("metric code " + std::to_string(metric) + " is unknown");
  if (M < 2 || M > 256) r.fail("M " + std::to_string(M) + " is outside [2, 256]");
  if (efc < 1 || efc > kMaxEf) r.fail("ef_construction " + std::to_string(efc) + " is outside [1, " + std::to_string(kMaxEf) + "]");
  if (def_ef > kMaxEf) r.fail("the default ef " + std::to_string(def_ef) + " exceeds " + std::to_string(kMaxEf));
  const Layout lay(dim, M);
  Preamble p = hdr.version == 1 ? read_preamble_v1(r, lay, efc) : read_preamble_v2(r, lay);
  if (p.slots > p.capacity) r.fail("element count " + std::to_string(p.slots) + " exceeds the capacity " + std::to_string(p.capacity));
  if (p.capacity > kMaxCapacity) r.fail("capacity " + std::to_string(p.capacity) + " exceeds " + std::to_string(kMaxCapacity));
  // Every element needs its level-0 record and a level entry: bounds the allocation by the file.
  if (p.slots > r.remaining() / (lay.sdpe + 4))
    r.fail("element count " + std::to_string(p.slots) + " needs more bytes than the file holds");
  if (p.max_level < -1 || p.max_level > kMaxLevel) r.fail("max level " + std::to_string(p.max_level) + " is outside [-1, " + std::to_string(kMaxLevel) + "]");
  if ((p.slots == 0) != (p.max_level == -1)) r.fail("max level " + std::to_string(p.max_level) + " does not fit an element count of " + std::to_string(p.slots));
  if (p.slots && p.entry >= p.slots) r.fail("entry point " + std::to_string(p.entry) + " is not below the element count " + std::to_string(p.slots));
  if (p.has_deleted_count && p.deleted > p.slots) r.fail("deleted count exceeds the element count");

  auto index = std::make_unique<VectorIndex>(dim, static_cast<Metric>(metric), M, efc);
  if (def_ef) index->default_ef_ = def_ef;
  HnswImpl& impl = *index->impl_;
  impl.level_seed = p.seed;
  impl.h = std::make_unique<Hnsw>(&impl.space, std::max<size_t>(p.slots, kMinCapacity), M, efc, p.seed,
                                  /*allow_replace_deleted=*/true);
  Hnsw& h = *impl.h;
  const size_t slots = p.slots;
  // From here the destructor frees what was read: levels start at 0 (no link lists to free).
  h.cur_element_count = slots;
  r.read(h.data_level0_memory_, slots * lay.sdpe, "the level-0 block");
  if (hdr.version == 1) {
    for (size_t i = 0; i < slots; ++i) {
      uint32_t bytes = r.get<uint32_t>("a link-list size");
      if (bytes % lay.sle != 0 || bytes / lay.sle > size_t(kMaxLevel))
        r.fail("element " + std::to_string(i) + " has link lists of " + std::to_string(bytes) + " bytes");
      if (bytes > r.remaining()) r.fail("truncated: the link lists of element " + std::to_string(i));
      h.linkLists_[i] = bytes ? HnswImpl::alloc_links(bytes) : nullptr;
      h.element_levels_[i] = int(bytes / lay.sle);
      if (bytes) r.read(h.linkLists_[i], bytes, "a link list");
    }
  } else {
    std::vector<uint32_t> levels(slots);
    r.read(levels.data(), slots * sizeof(uint32_t), "the levels");
    uint64_t upper = 0;
    for (size_t i = 0; i < slots; ++i) {
      if (levels[i] > uint32_t(p.max_level))
        r.fail("element " + std::to_string(i) + " has level " + std::to_string(levels[i]) + " above the max level " + std::to_string(p.max_level));
      upper += uint64_t(levels[i]) * lay.sle;
    }
    if (upper != r.remaining())
      r.fail("the upper link lists need " + std::to_string(upper) + " bytes; " + std::to_string(r.remaining()) + " remain");
    for (size_t i = 0; i < slots; ++i) {
      h.linkLists_[i] = levels[i] ? HnswImpl::alloc_links(levels[i] * lay.sle) : nullptr;
      h.element_levels_[i] = int(levels[i]);
      if (levels[i]) r.read(h.linkLists_[i], levels[i] * lay.sle, "a link list");
    }
  }
  r.finish();
  index->validate_graph(r, p, live);
  return index;
}

void VectorIndex::validate_graph(const PayloadReader& r, const Preamble& p, uint64_t live) {
  Hnsw& h = *impl_->h;
  const size_t slots = p.slots;
  auto where = [](size_t i, int l) { return "element " + std::to_string(i) + " at level " + std::to_string(l); };
  int top = -1;
  size_t deleted = 0;
  h.label_lookup_.reserve(slots);
  for (size_t i = 0; i < slots; ++i) {
    const int level = h.element_levels_[i];
    if (level > p.max_level) r.fail(where(i, level) + ": level above the max level " + std::to_string(p.max_level));
    top = std::max(top, level);
    for (int l = 0; l <= level; ++l) {
      auto* ll = l == 0 ? h.get_linklist0(tableint(i)) : h.get_linklist(tableint(i), l);
      uint32_t head;
      std::memcpy(&head, ll, sizeof head);
      uint32_t count = head & 0xFFFFu, flags = head >> 16;
      size_t cap = l == 0 ? h.maxM0_ : h.maxM_;
      if (count > cap) r.fail(where(i, l) + ": " + std::to_string(count) + " links, the layer's maximum is " + std::to_string(cap));
      if (flags > (l == 0 ? 1u : 0u)) r.fail(where(i, l) + ": unknown bits in the link header");
      const auto* nbrs = reinterpret_cast<const tableint*>(ll + 1);
      for (uint32_t k = 0; k < count; ++k) {
        if (nbrs[k] >= slots) r.fail(where(i, l) + ": neighbour id " + std::to_string(nbrs[k]) + " is not below the element count " + std::to_string(slots));
        if (h.element_levels_[nbrs[k]] < l) r.fail(where(i, l) + ": neighbour " + std::to_string(nbrs[k]) + " has no level " + std::to_string(l));
      }
    }
    deleted += h.isMarkedDeleted(tableint(i));
    uint64_t label = h.getExternalLabel(tableint(i));
    if (label > kMaxId) r.fail("element " + std::to_string(i) + ": label " + std::to_string(label) + " exceeds 2**63-1");
    if (!h.label_lookup_.emplace(label, tableint(i)).second) r.fail("label " + std::to_string(label) + " appears twice");
    const float* v = reinterpret_cast<const float*>(h.getDataByInternalId(tableint(i)));
    for (size_t j = 0; j < dim_; ++j)
      if (!std::isfinite(v[j])) r.fail("element " + std::to_string(i) + ": the vector has a NaN or infinite value");
    if (norm_too_large(v, dim_, metric_)) r.fail("element " + std::to_string(i) + ": the vector's norm is above 1e18");
  }
  if (top != p.max_level) r.fail("max level " + std::to_string(p.max_level) + " but the highest element level is " + std::to_string(top));
  if (slots && h.element_levels_[p.entry] != p.max_level)
    r.fail("entry point " + std::to_string(p.entry) + " has level " + std::to_string(h.element_levels_[p.entry]) + ", not the max level");
  if (p.has_deleted_count && deleted != p.deleted)
    r.fail(std::to_string(deleted) + " elements carry a deleted mark; the preamble says " + std::to_string(p.deleted));
  if (slots - deleted != live)
    r.fail("live element count " + std::to_string(slots - deleted) + " disagrees with the header's " + std::to_string(live));
  h.num_deleted_ = deleted;
  for (size_t i = 0; i < slots; ++i)
    if (h.isMarkedDeleted(tableint(i))) h.deleted_elements.insert(tableint(i));
  h.maxlevel_ = int(p.max_level);
  h.enterpoint_node_ = slots ? tableint(p.entry) : tableint(-1);
}

}  // namespace tailrank
