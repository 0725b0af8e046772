#include "index.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <unistd.h>
#include <unordered_map>

#include "common.hpp"
#include "distance.hpp"
// hnswlib's SSE prefetches read the id one past a full upper-layer link list, a few bytes beyond
// its malloc'd block: harmless in practice, but AddressSanitizer stops on it. Sanitized builds
// therefore go without hnswlib's manual vectorization (the distance kernels are our own anyway).
#if defined(__SANITIZE_ADDRESS__)
#define NO_MANUAL_VECTORIZATION
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NO_MANUAL_VECTORIZATION
#endif
#endif
#include "hnswlib/hnswlib.h"

namespace tailrank {

namespace {
constexpr uint32_t kIndexVersion = 1;
constexpr size_t kAddChunk = 1024;       // vectors per exclusive section: searches interleave
constexpr size_t kMinCapacity = 1024;
constexpr uint64_t kMaxId = (uint64_t{1} << 63) - 1;  // ids travel as int64 to Python

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

std::string temp_path_for(const std::string& hint) {
  std::random_device rd;
  auto dir = std::filesystem::temp_directory_path();
  return (dir / ("tailrank-" + hint + "-" + std::to_string(::getpid()) + "-" + std::to_string(rd()))).string();
}

struct TempFile {
  std::string path;
  ~TempFile() { std::remove(path.c_str()); }
};
}  // namespace

class HnswImpl {
 public:
  HnswImpl(size_t dim, Metric metric) : space(dim, metric) {}
  Space space;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> h;
};

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
  if (ef_construction < 1) throw std::invalid_argument("ef_construction must be >= 1");
  default_ef_ = std::max<size_t>(64, ef_construction / 2);
  impl_ = std::make_unique<HnswImpl>(dim, metric);
  impl_->h = std::make_unique<hnswlib::HierarchicalNSW<float>>(
      &impl_->space, std::max(capacity, kMinCapacity), M, ef_construction, /*random_seed=*/100,
      /*allow_replace_deleted=*/true);
}

VectorIndex::~VectorIndex() = default;

void VectorIndex::set_default_ef(size_t ef) {
  if (ef < 1) throw std::invalid_argument("ef must be >= 1");
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
  float inv = norm > 0 ? float(1.0 / std::sqrt(norm)) : 0.0f;
  for (size_t i = 0; i < dim_; ++i) out[i] = in[i] * inv;
}

void VectorIndex::ensure_capacity_locked(size_t needed) {
  auto& h = *impl_->h;
  if (needed <= h.max_elements_) return;
  h.resizeIndex(std::max(needed, h.max_elements_ * 2));
}

void VectorIndex::add(const float* vectors, const uint64_t* ids, size_t n, size_t threads) {
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] > kMaxId) throw std::invalid_argument("ids must be in [0, 2**63-1]; got " + std::to_string(ids[i]));
    for (size_t j = 0; j < dim_; ++j)
      if (!std::isfinite(vectors[i * dim_ + j]))
        throw std::invalid_argument("vector " + std::to_string(i) + " has a NaN or infinite value");
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
    ensure_capacity_locked(h.cur_element_count + (fresh.size() - reuse));
    parallel_for(fresh.size() - reuse, threads, [&](size_t t) {
      size_t r = fresh[reuse + t];
      h.addPoint(prepared.data() + r * dim_, ids[rows[r]], /*replace_deleted=*/true);  // no vacant slot left
    });
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
  std::shared_lock<RwLock> lk(mu_);
  parallel_for(n, p.threads, [&](size_t i) {
    search_locked(queries + i * dim_, p, out_ids + i * p.k, out_scores + i * p.k);
  });
}

void VectorIndex::save(const std::string& path) const {
  std::shared_lock<RwLock> lk(mu_);
  TempFile tmp{path + ".hnsw." + std::to_string(::getpid()) + "." + std::to_string(std::random_device{}()) + ".tmp"};
  try {
    impl_->h->saveIndex(tmp.path);
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot save index to " + path + ": " + e.what());
  }
  std::vector<char> payload = read_file(tmp.path);
  uint64_t fields[6] = {dim_, static_cast<uint64_t>(metric_), impl_->h->cur_element_count - impl_->h->num_deleted_,
                        M_, ef_construction_, default_ef_};
  FileHeader hdr = make_header(kIndexFile, kIndexVersion, fields, payload.data(), payload.size());
  atomic_write(path, {{&hdr, sizeof hdr}, {payload.data(), payload.size()}});
}

std::unique_ptr<VectorIndex> VectorIndex::load(const std::string& path) {
  std::vector<char> bytes = read_file(path);
  const FileHeader& hdr = check_header(bytes, kIndexFile, kIndexVersion, path);
  size_t dim = hdr.fields[0];
  if (hdr.fields[1] > 2 || dim == 0 || dim > 65536 || hdr.fields[3] < 2 || hdr.fields[3] > 256)
    throw CorruptFileError(path + ": header fields out of range");
  auto index = std::make_unique<VectorIndex>(dim, static_cast<Metric>(hdr.fields[1]), hdr.fields[3], hdr.fields[4]);
  index->default_ef_ = hdr.fields[5] ? hdr.fields[5] : index->default_ef_;
  TempFile tmp{temp_path_for("index-load")};
  {
    FILE* f = std::fopen(tmp.path.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot create a temp file in " + std::filesystem::temp_directory_path().string());
    size_t n = bytes.size() - sizeof(FileHeader);
    bool ok = std::fwrite(bytes.data() + sizeof(FileHeader), 1, n, f) == n;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) throw std::runtime_error("cannot write a temp file in " + std::filesystem::temp_directory_path().string());
  }
  bytes = {};
  auto h = std::make_unique<hnswlib::HierarchicalNSW<float>>(&index->impl_->space);
  h->allow_replace_deleted_ = true;
  try {
    h->loadIndex(tmp.path, &index->impl_->space);
  } catch (const std::exception& e) {
    throw CorruptFileError(path + ": index payload is unreadable (" + e.what() + ")");
  }
  if (h->data_size_ != dim * sizeof(float) || h->cur_element_count - h->num_deleted_ != hdr.fields[2])
    throw CorruptFileError(path + ": index payload disagrees with its header");
  index->impl_->h = std::move(h);
  return index;
}

}  // namespace tailrank
