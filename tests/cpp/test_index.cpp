// Tests for common.hpp (checksums, atomic files, headers) and the HNSW VectorIndex.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iterator>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "common.hpp"
#include "doc_store.hpp"
#include "index.hpp"
#include "testing.hpp"

namespace tailrank {
namespace {

using testing::TempDir;

// ---------------------------------------------------------------------------------------------
// common.hpp

TEST(Crc32c, KnownValue) {
  const char* check = "123456789";
  EXPECT_EQ(crc32c(check, 9), 0xE3069283u);
  EXPECT_EQ(crc32c(check, 0), 0u);
  // Continuing from a previous crc equals one pass over the whole range.
  EXPECT_EQ(crc32c(check + 4, 5, crc32c(check, 4)), 0xE3069283u);
}

TEST(AtomicWrite, RoundTripAndOverwrite) {
  TempDir dir;
  const std::string path = dir.file("data.bin");
  const std::string a = "hello, ";
  std::vector<char> b(1000);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>(i * 7);
  atomic_write(path, {{a.data(), a.size()}, {b.data(), b.size()}, {nullptr, 0}});

  std::vector<char> want(a.begin(), a.end());
  want.insert(want.end(), b.begin(), b.end());
  EXPECT_EQ(read_file(path), want);

  // Overwriting with something shorter leaves exactly the new bytes and no temp files beside it.
  atomic_write(path, {{"xy", 2}});
  EXPECT_EQ(read_file(path), (std::vector<char>{'x', 'y'}));
  atomic_write(path, {});
  EXPECT_TRUE(read_file(path).empty());
  size_t entries = std::distance(std::filesystem::directory_iterator(dir.path()), {});
  EXPECT_EQ(entries, 1u);

  EXPECT_THROW(read_file(dir.file("missing.bin")), CorruptFileError);
  EXPECT_THROW(atomic_write(dir.file("no-such-dir/x.bin"), {{"x", 1}}), std::runtime_error);
}

class CheckHeaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    payload_.resize(37);
    for (size_t i = 0; i < payload_.size(); ++i) payload_[i] = static_cast<char>(3 * i + 1);
    const uint64_t fields[6] = {32, 2, 5, 16, 200, 64};
    FileHeader h = make_header(kIndexFile, 1, fields, payload_.data(), payload_.size());
    bytes_.resize(sizeof h);
    std::memcpy(bytes_.data(), &h, sizeof h);
    bytes_.insert(bytes_.end(), payload_.begin(), payload_.end());
  }
  std::vector<char> payload_;
  std::vector<char> bytes_;
};

TEST_F(CheckHeaderTest, AcceptsGoodFile) {
  const FileHeader& h = check_header(bytes_, kIndexFile, 1, "f");
  EXPECT_EQ(std::memcmp(h.magic, "TAILRANK", 8), 0);
  EXPECT_EQ(h.fields[0], 32u);
  EXPECT_EQ(h.fields[5], 64u);
  EXPECT_EQ(h.payload_size, payload_.size());
  EXPECT_EQ(h.payload_crc, crc32c(payload_.data(), payload_.size()));
  // make_header_crc with the same checksum gives the same bytes.
  const uint64_t fields[6] = {32, 2, 5, 16, 200, 64};
  FileHeader h2 = make_header_crc(kIndexFile, 1, fields, payload_.size(), crc32c(payload_.data(), payload_.size()));
  EXPECT_EQ(std::memcmp(&h2, bytes_.data(), sizeof h2), 0);
}

TEST_F(CheckHeaderTest, RejectsEmptyAndTruncated) {
  EXPECT_THROW(check_header({}, kIndexFile, 1, "f"), CorruptFileError);
  for (size_t len : {size_t{1}, size_t{40}, sizeof(FileHeader) - 1, sizeof(FileHeader), bytes_.size() - 1}) {
    std::vector<char> cut(bytes_.begin(), bytes_.begin() + len);
    EXPECT_THROW(check_header(cut, kIndexFile, 1, "f"), CorruptFileError) << "length " << len;
  }
  std::vector<char> longer = bytes_;
  longer.push_back(0);
  EXPECT_THROW(check_header(longer, kIndexFile, 1, "f"), CorruptFileError);
}

TEST_F(CheckHeaderTest, RejectsEveryBitFlip) {
  // CRC-32C detects every single-bit error, in the header and in the payload.
  for (size_t byte = 0; byte < bytes_.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<char> bad = bytes_;
      bad[byte] = static_cast<char>(bad[byte] ^ (1 << bit));
      EXPECT_THROW(check_header(bad, kIndexFile, 1, "f"), CorruptFileError) << "byte " << byte << " bit " << bit;
    }
  }
}

TEST_F(CheckHeaderTest, RejectsWrongKindAndVersion) {
  EXPECT_THROW(check_header(bytes_, kDocStoreFile, 1, "f"), CorruptFileError);
  EXPECT_THROW(check_header(bytes_, kIndexFile, 2, "f"), CorruptFileError);
  try {
    check_header(bytes_, kDocStoreFile, 1, "/some/file");
    FAIL() << "expected CorruptFileError";
  } catch (const CorruptFileError& e) {
    EXPECT_NE(std::string(e.what()).find("/some/file"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// VectorIndex helpers

constexpr size_t kDim = 32;

float dot(const float* a, const float* b, size_t dim) {
  double s = 0;
  for (size_t j = 0; j < dim; ++j) s += double(a[j]) * b[j];
  return float(s);
}

/// The score the index reports for (query, vector) under `metric`: higher is better except l2.
float true_score(Metric metric, const float* q, const float* v, size_t dim) {
  switch (metric) {
    case Metric::kIp: return dot(q, v, dim);
    case Metric::kCosine: return dot(q, v, dim) / std::sqrt(dot(q, q, dim) * dot(v, v, dim));
    default: {
      double s = 0;
      for (size_t j = 0; j < dim; ++j) s += (double(q[j]) - v[j]) * (double(q[j]) - v[j]);
      return float(s);
    }
  }
}

bool better(Metric metric, float a, float b) { return metric == Metric::kL2 ? a < b : a > b; }

/// Exact top-k ids over rows listed in `candidates` (index into `vectors`, id = ids[row]).
std::vector<int64_t> brute_top_k(Metric metric, const float* q, const std::vector<float>& vectors,
                                 const std::vector<uint64_t>& ids, const std::vector<size_t>& candidates, size_t k) {
  std::vector<std::pair<float, size_t>> scored;
  for (size_t row : candidates) scored.emplace_back(true_score(metric, q, &vectors[row * kDim], kDim), row);
  size_t keep = std::min(k, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + keep, scored.end(),
                    [&](const auto& a, const auto& b) { return better(metric, a.first, b.first); });
  std::vector<int64_t> out;
  for (size_t i = 0; i < keep; ++i) out.push_back(int64_t(ids[scored[i].second]));
  return out;
}

std::vector<uint64_t> iota_ids(size_t n, uint64_t first = 0) {
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

struct Hits {
  std::vector<int64_t> ids;
  std::vector<float> scores;
};

Hits search(const VectorIndex& index, const float* queries, size_t n, SearchParams p) {
  Hits h{std::vector<int64_t>(n * p.k), std::vector<float>(n * p.k)};
  index.search(queries, n, p, h.ids.data(), h.scores.data());
  return h;
}

Hits search1(const VectorIndex& index, const float* query, size_t k) {
  SearchParams p;
  p.k = k;
  return search(index, query, 1, p);
}

std::vector<float> random_vectors(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n * kDim);
  for (float& x : v) x = normal(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------
// VectorIndex

TEST(VectorIndexBasics, MetricNamesAndArguments) {
  EXPECT_EQ(parse_metric("cosine"), Metric::kCosine);
  EXPECT_EQ(parse_metric("ip"), Metric::kIp);
  EXPECT_EQ(parse_metric("l2"), Metric::kL2);
  EXPECT_THROW(parse_metric("L2"), std::invalid_argument);
  EXPECT_THROW(parse_metric(""), std::invalid_argument);
  for (Metric m : {Metric::kCosine, Metric::kIp, Metric::kL2}) EXPECT_EQ(parse_metric(metric_name(m)), m);

  EXPECT_THROW(VectorIndex(0, Metric::kL2), std::invalid_argument);
  EXPECT_THROW(VectorIndex(65537, Metric::kL2), std::invalid_argument);
  EXPECT_THROW(VectorIndex(8, Metric::kL2, 1), std::invalid_argument);
  EXPECT_THROW(VectorIndex(8, Metric::kL2, 16, 0), std::invalid_argument);
  VectorIndex index(8, Metric::kIp, 12, 40);
  EXPECT_EQ(index.dim(), 8u);
  EXPECT_EQ(index.metric(), Metric::kIp);
  EXPECT_EQ(index.M(), 12u);
  EXPECT_EQ(index.ef_construction(), 40u);
  EXPECT_EQ(index.size(), 0u);
  EXPECT_THROW(index.set_default_ef(0), std::invalid_argument);
  index.set_default_ef(33);
  EXPECT_EQ(index.default_ef(), 33u);
}

TEST(VectorIndexBasics, InvalidAddChangesNothing) {
  std::mt19937 rng(1);
  VectorIndex index(kDim, Metric::kL2);
  auto v = random_vectors(3, rng);
  auto ids = iota_ids(3);
  index.add(v.data(), ids.data(), 3);

  auto bad = random_vectors(2, rng);
  bad[kDim + 5] = std::nanf("");
  const uint64_t new_ids[2] = {10, 11};
  EXPECT_THROW(index.add(bad.data(), new_ids, 2), std::invalid_argument);
  bad[kDim + 5] = INFINITY;
  EXPECT_THROW(index.add(bad.data(), new_ids, 2), std::invalid_argument);
  bad[kDim + 5] = 0.0f;
  const uint64_t too_big[2] = {12, uint64_t{1} << 63};
  EXPECT_THROW(index.add(bad.data(), too_big, 2), std::invalid_argument);
  bad[kDim + 5] = 1e30f;  // finite, but its squared distances overflow float32
  EXPECT_THROW(index.add(bad.data(), new_ids, 2), std::invalid_argument);
  EXPECT_EQ(index.size(), 3u);
  EXPECT_EQ(index.ids(), iota_ids(3));
}

class VectorIndexMetric : public ::testing::TestWithParam<Metric> {};

TEST_P(VectorIndexMetric, RecallAgainstBruteForce) {
  const Metric metric = GetParam();
  std::mt19937 rng(1234 + int(metric));
  const size_t n = 2000, nq = 100, k = 10;
  auto data = testing::clustered_vectors(n + nq, kDim, 20, rng);
  std::vector<float> base(data.begin(), data.begin() + n * kDim);
  std::vector<float> queries(data.begin() + n * kDim, data.end());
  auto ids = iota_ids(n, 5000);  // ids unrelated to row numbers

  VectorIndex index(kDim, metric, 12, 48);
  index.add(base.data(), ids.data(), n);
  ASSERT_EQ(index.size(), n);

  SearchParams p;
  p.k = k;
  Hits hits = search(index, queries.data(), nq, p);
  std::vector<size_t> all_rows(n);
  std::iota(all_rows.begin(), all_rows.end(), 0);
  size_t found = 0;
  for (size_t qi = 0; qi < nq; ++qi) {
    const float* q = &queries[qi * kDim];
    auto truth = brute_top_k(metric, q, base, ids, all_rows, k);
    std::set<int64_t> truth_set(truth.begin(), truth.end());
    for (size_t j = 0; j < k; ++j) {
      int64_t id = hits.ids[qi * k + j];
      ASSERT_GE(id, 5000);
      ASSERT_LT(id, int64_t(5000 + n));
      found += truth_set.count(id);
      // Reported scores are the metric's true scores, best first.
      float want = true_score(metric, q, &base[(id - 5000) * kDim], kDim);
      EXPECT_NEAR(hits.scores[qi * k + j], want, 1e-3f * std::max(1.0f, std::fabs(want)));
      if (j > 0) {
        EXPECT_FALSE(better(metric, hits.scores[qi * k + j], hits.scores[qi * k + j - 1]));
      }
    }
  }
  double recall = double(found) / double(nq * k);
  EXPECT_GE(recall, 0.95) << "metric " << metric_name(metric);

  // Several threads give the same answers as one.
  p.threads = 1;
  Hits serial = search(index, queries.data(), nq, p);
  EXPECT_EQ(serial.ids, hits.ids);
}

TEST_P(VectorIndexMetric, ReAddReplacesVector) {
  const Metric metric = GetParam();
  std::mt19937 rng(7);
  const size_t n = 300;
  auto v = random_vectors(n, rng);
  auto ids = iota_ids(n);
  VectorIndex index(kDim, metric, 16, 64);
  index.add(v.data(), ids.data(), n);

  // Move id 42 to a point far from everything; it must be found there, not at its old place.
  std::vector<float> moved(kDim, 0.0f);
  moved[0] = 50.0f;
  moved[1] = -50.0f;
  const uint64_t id42 = 42;
  index.add(moved.data(), &id42, 1);
  EXPECT_EQ(index.size(), n);
  Hits at_new = search1(index, moved.data(), 1);
  EXPECT_EQ(at_new.ids[0], 42);
  if (metric == Metric::kL2) {
    EXPECT_FLOAT_EQ(at_new.scores[0], 0.0f);
    Hits at_old = search1(index, &v[42 * kDim], 1);
    EXPECT_NE(at_old.ids[0], 42);
  }

  // A repeated id within one batch: the last row wins.
  std::vector<float> twice(2 * kDim, 0.0f);
  twice[2] = 50.0f;           // first occurrence
  twice[kDim + 3] = 50.0f;    // second occurrence
  const uint64_t same[2] = {7, 7};
  index.add(twice.data(), same, 2);
  EXPECT_EQ(index.size(), n);
  EXPECT_EQ(search1(index, &twice[kDim], 1).ids[0], 7);
  if (metric == Metric::kL2) {
    EXPECT_FLOAT_EQ(search1(index, &twice[kDim], 1).scores[0], 0.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(AllMetrics, VectorIndexMetric,
                         ::testing::Values(Metric::kCosine, Metric::kIp, Metric::kL2),
                         [](const auto& info) { return std::string(metric_name(info.param)); });

TEST(VectorIndex, DeletedNeverReturned) {
  std::mt19937 rng(11);
  const size_t n = 600;
  auto v = testing::clustered_vectors(n, kDim, 10, rng);
  auto ids = iota_ids(n);
  VectorIndex index(kDim, Metric::kL2, 16, 64);
  index.add(v.data(), ids.data(), n);

  std::vector<uint64_t> gone;
  for (uint64_t id = 0; id < n; id += 5) gone.push_back(id);
  index.remove(gone.data(), gone.size());
  EXPECT_EQ(index.size(), n - gone.size());
  std::unordered_set<int64_t> gone_set(gone.begin(), gone.end());
  for (uint64_t id : gone) EXPECT_FALSE(index.contains(id));
  for (uint64_t id : index.ids()) EXPECT_EQ(gone_set.count(int64_t(id)), 0u);

  // Query with the deleted vectors themselves: their own ids must never come back.
  std::vector<float> queries;
  for (uint64_t id : gone) queries.insert(queries.end(), &v[id * kDim], &v[id * kDim] + kDim);
  SearchParams p;
  p.k = 20;
  Hits hits = search(index, queries.data(), gone.size(), p);
  for (int64_t id : hits.ids) {
    ASSERT_GE(id, 0);
    EXPECT_EQ(gone_set.count(id), 0u) << "deleted id " << id << " returned";
  }
  // Deleting again is an unknown id.
  EXPECT_THROW(index.remove(&gone[0], 1), UnknownIdError);
}

TEST(VectorIndex, RemoveUnknownChangesNothing) {
  std::mt19937 rng(12);
  auto v = random_vectors(50, rng);
  auto ids = iota_ids(50);
  VectorIndex index(kDim, Metric::kCosine);
  index.add(v.data(), ids.data(), 50);
  const uint64_t batch[3] = {3, 999, 4};
  EXPECT_THROW(index.remove(batch, 3), UnknownIdError);
  EXPECT_EQ(index.size(), 50u);
  EXPECT_TRUE(index.contains(3));
  EXPECT_TRUE(index.contains(4));
  EXPECT_EQ(search1(index, &v[3 * kDim], 1).ids[0], 3);
  // Repeated ids in one remove are fine.
  const uint64_t twice[2] = {3, 3};
  index.remove(twice, 2);
  EXPECT_EQ(index.size(), 49u);
}

TEST(VectorIndex, CapacityGrowsPastInitial) {
  std::mt19937 rng(13);
  const size_t n = 1300;
  auto v = random_vectors(n, rng);
  auto ids = iota_ids(n);
  VectorIndex index(kDim, Metric::kL2, 8, 16, /*capacity=*/10);
  const size_t initial = index.capacity();
  ASSERT_LT(initial, n);
  index.add(v.data(), ids.data(), 700);                    // within the initial capacity
  index.add(v.data() + 700 * kDim, ids.data() + 700, 400);  // crosses it
  index.add(v.data() + 1100 * kDim, ids.data() + 1100, n - 1100, /*threads=*/2);
  EXPECT_EQ(index.size(), n);
  EXPECT_GE(index.capacity(), n);
  for (size_t i = 0; i < n; i += 97) EXPECT_EQ(search1(index, &v[i * kDim], 1).ids[0], int64_t(i));
}

TEST(VectorIndex, ReviveDeletedAndAddNewAtFullCapacity) {
  // A batch that revives deleted ids and adds new ones, when the index is full: the revived ids
  // take their old slots back, so the new ones need room of their own.
  std::mt19937 rng(14);
  VectorIndex index(kDim, Metric::kL2, 8, 24);
  const size_t full = index.capacity();
  auto v = random_vectors(full + 200, rng);
  auto ids = iota_ids(full);
  index.add(v.data(), ids.data(), full);
  std::vector<uint64_t> gone = iota_ids(50);
  index.remove(gone.data(), gone.size());

  size_t next_row = full;
  for (size_t threads : {size_t{1}, size_t{2}}) {
    // Revived ids 0..49 interleaved with new ids, each with a vector not seen before; done once
    // serially and once on two threads.
    std::vector<uint64_t> batch;
    std::vector<float> rows;
    for (size_t i = 0; i < 50; ++i) {
      batch.push_back(i);
      batch.push_back(100000 * threads + i);
      for (int twice = 0; twice < 2; ++twice, ++next_row)
        rows.insert(rows.end(), &v[next_row * kDim], &v[next_row * kDim] + kDim);
    }
    ASSERT_NO_THROW(index.add(rows.data(), batch.data(), batch.size(), threads)) << "threads " << threads;
    // Found again by their new vectors. Not always: a reused slot is moved with hnswlib's
    // updatePoint, which links the point out to its new neighbourhood but not back in.
    size_t top1 = 0, top10 = 0;
    for (size_t r = 0; r < batch.size(); ++r) {
      EXPECT_TRUE(index.contains(batch[r]));
      Hits h = search1(index, &rows[r * kDim], 10);
      top1 += h.ids[0] == int64_t(batch[r]);
      top10 += std::find(h.ids.begin(), h.ids.end(), int64_t(batch[r])) != h.ids.end();
    }
    EXPECT_GE(top1, batch.size() * 95 / 100);
    index.remove(gone.data(), gone.size());
  }
  EXPECT_EQ(index.size(), full - 50 + 100);
}

TEST(VectorIndex, AllowListSmallIsExact) {
  std::mt19937 rng(15);
  const size_t n = 600;
  auto v = testing::clustered_vectors(n, kDim, 20, rng);
  auto ids = iota_ids(n);
  VectorIndex index(kDim, Metric::kIp, 16, 64);
  index.add(v.data(), ids.data(), n);
  const uint64_t deleted = 17;
  index.remove(&deleted, 1);

  std::vector<uint64_t> allowed_ids = {deleted, 123456, 999999};  // a deleted id and two never added
  std::vector<size_t> allowed_rows;
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  while (allowed_rows.size() < 30) {
    size_t r = pick(rng);
    if (r == deleted || std::count(allowed_rows.begin(), allowed_rows.end(), r)) continue;
    allowed_rows.push_back(r);
    allowed_ids.push_back(r);
  }
  AllowList allow(allowed_ids);
  auto queries = testing::clustered_vectors(20, kDim, 20, rng);
  for (size_t k : {size_t{10}, size_t{40}}) {
    SearchParams p;
    p.k = k;
    p.allow = &allow;
    Hits hits = search(index, queries.data(), 20, p);
    for (size_t qi = 0; qi < 20; ++qi) {
      auto truth = brute_top_k(Metric::kIp, &queries[qi * kDim], v, ids, allowed_rows, k);
      std::vector<int64_t> got(hits.ids.begin() + qi * k, hits.ids.begin() + (qi + 1) * k);
      truth.resize(k, -1);  // k = 40 > 30 allowed: the tail is -1
      EXPECT_EQ(got, truth) << "query " << qi << " k " << k;
    }
  }
}

TEST(VectorIndex, AllowListLargeStaysInside) {
  // More than 4096 allowed ids takes the filtered HNSW walk rather than the exact scan.
  std::mt19937 rng(16);
  const size_t n = 600;
  auto v = testing::clustered_vectors(n, kDim, 20, rng);
  auto ids = iota_ids(n);
  VectorIndex index(kDim, Metric::kL2, 16, 64);
  index.add(v.data(), ids.data(), n);
  std::vector<uint64_t> even;
  for (uint64_t id = 0; id < 10000; id += 2) even.push_back(id);  // 5000 ids, 300 of them present
  AllowList allow(even);
  std::vector<size_t> allowed_rows;
  for (size_t r = 0; r < n; r += 2) allowed_rows.push_back(r);

  const size_t nq = 50, k = 10;
  auto queries = testing::clustered_vectors(nq, kDim, 20, rng);
  SearchParams p;
  p.k = k;
  p.allow = &allow;
  Hits hits = search(index, queries.data(), nq, p);
  size_t found = 0;
  for (size_t qi = 0; qi < nq; ++qi) {
    auto truth = brute_top_k(Metric::kL2, &queries[qi * kDim], v, ids, allowed_rows, k);
    std::set<int64_t> truth_set(truth.begin(), truth.end());
    for (size_t j = 0; j < k; ++j) {
      int64_t id = hits.ids[qi * k + j];
      ASSERT_GE(id, 0);
      EXPECT_TRUE(allow.contains(uint64_t(id))) << id;
      found += truth_set.count(id);
    }
  }
  EXPECT_GE(double(found) / double(nq * k), 0.9);
}

TEST(VectorIndex, KLargerThanSize) {
  std::mt19937 rng(17);
  auto v = random_vectors(5, rng);
  auto ids = iota_ids(5, 100);
  for (Metric metric : {Metric::kCosine, Metric::kL2}) {
    VectorIndex index(kDim, metric);
    Hits empty = search1(index, v.data(), 4);
    EXPECT_EQ(empty.ids, std::vector<int64_t>(4, -1));
    index.add(v.data(), ids.data(), 5);
    Hits h = search1(index, v.data(), 8);
    std::set<int64_t> got(h.ids.begin(), h.ids.begin() + 5);
    EXPECT_EQ(got, (std::set<int64_t>{100, 101, 102, 103, 104}));
    for (size_t j = 5; j < 8; ++j) {
      EXPECT_EQ(h.ids[j], -1);
      EXPECT_TRUE(std::isinf(h.scores[j]));
    }
    // k = 0 writes nothing and does not fail.
    SearchParams p;
    p.k = 0;
    index.search(v.data(), 1, p, nullptr, nullptr);
  }
}

TEST(VectorIndex, SaveLoadRoundTrip) {
  TempDir dir;
  std::mt19937 rng(18);
  const size_t n = 400, nq = 50;
  auto v = testing::clustered_vectors(n + nq, kDim, 15, rng);
  auto ids = iota_ids(n, 1);
  for (Metric metric : {Metric::kCosine, Metric::kIp, Metric::kL2}) {
    VectorIndex index(kDim, metric, 12, 48);
    index.add(v.data(), ids.data(), n);
    std::vector<uint64_t> gone = {1, 2, 3, 200, 399};
    index.remove(gone.data(), gone.size());
    index.set_default_ef(80);
    const std::string path = dir.file(std::string("index-") + metric_name(metric) + ".tri");
    index.save(path);

    auto loaded = VectorIndex::load(path);
    EXPECT_EQ(loaded->dim(), kDim);
    EXPECT_EQ(loaded->metric(), metric);
    EXPECT_EQ(loaded->M(), 12u);
    EXPECT_EQ(loaded->ef_construction(), 48u);
    EXPECT_EQ(loaded->default_ef(), 80u);
    EXPECT_EQ(loaded->size(), index.size());
    EXPECT_EQ(loaded->ids(), index.ids());
    SearchParams p;
    p.k = 10;
    Hits a = search(index, &v[n * kDim], nq, p);
    Hits b = search(*loaded, &v[n * kDim], nq, p);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.scores, b.scores);

    // The loaded index keeps working: deleted slots are reused and it still grows.
    auto more = random_vectors(10, rng);
    auto more_ids = iota_ids(10, 1000000);
    loaded->add(more.data(), more_ids.data(), 10);
    loaded->remove(&ids[10], 1);
    EXPECT_EQ(loaded->size(), index.size() + 10 - 1);
    EXPECT_EQ(search1(*loaded, more.data(), 1).ids[0], 1000000);
  }
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"index-cosine.tri", "index-ip.tri", "index-l2.tri"}));
}

TEST(VectorIndex, SaveLoadEmpty) {
  TempDir dir;
  VectorIndex index(kDim, Metric::kL2);
  index.save(dir.file("empty.tri"));
  auto loaded = VectorIndex::load(dir.file("empty.tri"));
  EXPECT_EQ(loaded->size(), 0u);
  std::mt19937 rng(19);
  auto v = random_vectors(3, rng);
  EXPECT_EQ(search1(*loaded, v.data(), 2).ids, std::vector<int64_t>(2, -1));
  auto ids = iota_ids(3);
  loaded->add(v.data(), ids.data(), 3);
  EXPECT_EQ(loaded->size(), 3u);
  EXPECT_EQ(search1(*loaded, &v[2 * kDim], 1).ids[0], 2);
}

TEST(VectorIndex, LoadRejectsDamagedFiles) {
  TempDir dir;
  std::mt19937 rng(20);
  auto v = random_vectors(200, rng);
  auto ids = iota_ids(200);
  VectorIndex index(kDim, Metric::kCosine, 8, 32);
  index.add(v.data(), ids.data(), 200);
  const std::string good_path = dir.file("good.tri");
  index.save(good_path);
  const std::vector<char> good = read_file(good_path);
  for (const auto& [what, bytes] : testing::damaged_copies(good)) {
    const std::string path = dir.file("bad.tri");
    testing::write_bytes(path, bytes);
    EXPECT_THROW(VectorIndex::load(path), CorruptFileError) << what;
  }
  EXPECT_THROW(VectorIndex::load(dir.file("missing.tri")), CorruptFileError);

  // A DocStore file is not an index.
  DocStore store(100);
  const int64_t flat[3] = {1, 2, 3};
  const int64_t offsets[2] = {0, 3};
  const uint64_t id = 1;
  store.add(&id, 1, flat, 3, offsets);
  store.save(dir.file("store.trd"));
  EXPECT_THROW(VectorIndex::load(dir.file("store.trd")), CorruptFileError);
  EXPECT_NO_THROW(VectorIndex::load(good_path));
}

TEST(VectorIndex, ConcurrentSearchWhileWriting) {
  std::mt19937 rng(21);
  const size_t base_n = 500, batch = 64;
  const size_t max_rounds = 200;
  auto v = testing::clustered_vectors(base_n + max_rounds * batch, kDim, 10, rng);
  auto queries = testing::clustered_vectors(64, kDim, 10, rng);
  VectorIndex index(kDim, Metric::kL2, 12, 48);
  auto base_ids = iota_ids(base_n);
  index.add(v.data(), base_ids.data(), base_n);

  // Ids are handed out in order; upper_bound is raised before an add starts, so any id a search
  // returns must be below the bound read after that search.
  std::atomic<uint64_t> upper_bound{base_n};
  std::atomic<bool> done{false};
  std::atomic<size_t> searches{0};
  std::vector<std::string> failures;
  std::mutex failures_mu;
  auto fail = [&](const std::string& msg) {
    std::lock_guard<std::mutex> g(failures_mu);
    if (failures.size() < 10) failures.push_back(msg);
  };

  std::thread writer([&] {
    std::mt19937 wrng(22);
    std::vector<uint64_t> removed;
    auto start = std::chrono::steady_clock::now();
    size_t round = 0;
    try {
      while (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1000) && round < max_rounds) {
        uint64_t first = upper_bound.load();
        std::vector<uint64_t> ids = iota_ids(batch, first);
        upper_bound.store(first + batch);
        index.add(&v[first * kDim], ids.data(), batch, 2);
        // Remove a few live ids; now and then bring removed ones back with new vectors.
        std::vector<uint64_t> live = index.ids();
        std::vector<uint64_t> drop;
        std::sample(live.begin(), live.end(), std::back_inserter(drop), 16, wrng);
        index.remove(drop.data(), drop.size());
        removed.insert(removed.end(), drop.begin(), drop.end());
        if (round % 3 == 2) {
          std::vector<uint64_t> back(removed.end() - 8, removed.end());
          removed.resize(removed.size() - 8);
          index.add(&v[(first % base_n) * kDim], back.data(), back.size(), 2);
        }
        ++round;
      }
    } catch (const std::exception& e) {
      fail(std::string("writer threw: ") + e.what());
    }
    done.store(true);
  });

  std::vector<std::thread> readers;
  for (size_t t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      SearchParams p;
      p.k = 10;
      p.threads = t % 2 ? 1 : 0;
      const size_t nq = 4;
      std::vector<int64_t> out_ids(nq * p.k);
      std::vector<float> out_scores(nq * p.k);
      size_t q = t;
      try {
        while (!done.load()) {
          index.search(&queries[(q % 60) * kDim], nq, p, out_ids.data(), out_scores.data());
          uint64_t bound = upper_bound.load();
          for (size_t i = 0; i < nq; ++i) {
            std::set<int64_t> seen;
            bool ended = false;
            for (size_t j = 0; j < p.k; ++j) {
              int64_t id = out_ids[i * p.k + j];
              if (id == -1) {
                ended = true;
                continue;
              }
              if (ended || id < 0 || uint64_t(id) >= bound || !seen.insert(id).second ||
                  !std::isfinite(out_scores[i * p.k + j]))
                fail("bad result id " + std::to_string(id) + " (bound " + std::to_string(bound) + ")");
            }
          }
          q += 4;
          searches.fetch_add(1);
        }
      } catch (const std::exception& e) {
        fail(std::string("reader threw: ") + e.what());
      }
    });
  }
  writer.join();
  for (auto& r : readers) r.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
  EXPECT_GT(searches.load(), 0u);
}

}  // namespace
}  // namespace tailrank
