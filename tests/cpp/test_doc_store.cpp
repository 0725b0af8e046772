// Tests for DocStore: storage width, add/get/replace/remove, validation, persistence, compaction.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "doc_store.hpp"
#include "index.hpp"
#include "testing.hpp"

namespace tailrank {
namespace {

using testing::TempDir;
using Doc = std::vector<int64_t>;

/// Flattens documents into the (flat, offsets) form DocStore::add takes.
struct Batch {
  std::vector<uint64_t> ids;
  std::vector<int64_t> flat;
  std::vector<int64_t> offsets{0};

  void push(uint64_t id, const Doc& doc) {
    ids.push_back(id);
    flat.insert(flat.end(), doc.begin(), doc.end());
    offsets.push_back(int64_t(flat.size()));
  }
  void add_to(DocStore& store) const { store.add(ids.data(), ids.size(), flat.data(), flat.size(), offsets.data()); }
};

std::vector<int32_t> as_i32(const Doc& d) { return std::vector<int32_t>(d.begin(), d.end()); }

Doc random_doc(std::mt19937& rng, size_t len, size_t vocab) {
  std::uniform_int_distribution<int64_t> tok(0, int64_t(vocab) - 1);
  Doc d(len);
  for (auto& t : d) t = tok(rng);
  return d;
}

/// Checks that `store` holds exactly `want`, through get(), contains(), ids() and view_locked().
void expect_contents(const DocStore& store, const std::map<uint64_t, Doc>& want) {
  ASSERT_EQ(store.size(), want.size());
  std::vector<uint64_t> ids;
  for (const auto& kv : want) ids.push_back(kv.first);
  EXPECT_EQ(store.ids(), ids);
  for (const auto& [id, doc] : want) {
    ASSERT_TRUE(store.contains(id)) << id;
    EXPECT_EQ(store.get(id), as_i32(doc)) << "document " << id;
  }
  auto lk = store.read_lock();
  for (const auto& [id, doc] : want) {
    TokenView v = store.view_locked(id);
    ASSERT_EQ(v.size, doc.size());
    if (v.size > 0) {
      EXPECT_EQ(v.u16 == nullptr, store.wide());
    }
    for (size_t i = 0; i < v.size; ++i) ASSERT_EQ(v[i], doc[i]) << "document " << id << " token " << i;
  }
}

TEST(DocStore, StorageWidthFollowsVocabulary) {
  EXPECT_FALSE(DocStore(30522).wide());   // BERT
  EXPECT_TRUE(DocStore(250002).wide());   // XLM-R
  EXPECT_FALSE(DocStore(65536).wide());   // every id still fits uint16
  EXPECT_TRUE(DocStore(65537).wide());
  EXPECT_EQ(DocStore(30522).vocab_size(), 30522u);
  EXPECT_THROW(DocStore(0), std::invalid_argument);
  EXPECT_THROW(DocStore(size_t(INT32_MAX) + 1), std::invalid_argument);

  // The largest id of each vocabulary survives the round trip through its storage.
  for (size_t vocab : {size_t{30522}, size_t{65536}, size_t{250002}}) {
    DocStore store(vocab);
    Batch b;
    b.push(1, {0, int64_t(vocab) - 1, 65535 % int64_t(vocab), 101});
    b.add_to(store);
    expect_contents(store, {{1, {0, int64_t(vocab) - 1, 65535 % int64_t(vocab), 101}}});
  }
}

class DocStoreWidth : public ::testing::TestWithParam<size_t> {};

TEST_P(DocStoreWidth, AddGetReplaceRemove) {
  const size_t vocab = GetParam();
  DocStore store(vocab);
  std::map<uint64_t, Doc> want = {{10, {101, 2023, 2003, 102}}, {3, {}}, {uint64_t{1} << 62, {7}}};
  Batch b;
  for (const auto& [id, doc] : want) b.push(id, doc);
  b.add_to(store);
  expect_contents(store, want);
  EXPECT_EQ(store.arena_tokens(), 5u);
  EXPECT_THROW(store.get(4), UnknownIdError);

  // Replace: same size, new contents; the old tokens stay as garbage until compaction.
  Batch r;
  r.push(10, {5, 6});
  r.add_to(store);
  want[10] = {5, 6};
  expect_contents(store, want);
  EXPECT_EQ(store.arena_tokens(), 7u);

  // A repeated id within one batch: the last one wins.
  Batch twice;
  twice.push(20, {1, 1, 1});
  twice.push(20, {2, 2});
  twice.add_to(store);
  want[20] = {2, 2};
  expect_contents(store, want);

  const uint64_t gone = 3;
  store.remove(&gone, 1);
  want.erase(3);
  expect_contents(store, want);
  EXPECT_THROW(store.get(3), UnknownIdError);

  // Unknown ids fail the whole call before anything is removed.
  const uint64_t mixed[2] = {10, 3};
  EXPECT_THROW(store.remove(mixed, 2), UnknownIdError);
  expect_contents(store, want);

  const uint64_t repeated[2] = {20, 20};
  store.remove(repeated, 2);
  want.erase(20);
  expect_contents(store, want);

  // Removed ids can come back.
  Batch again;
  again.push(3, {9});
  again.add_to(store);
  want[3] = {9};
  expect_contents(store, want);
}

TEST_P(DocStoreWidth, TokenOutsideVocabularyChangesNothing) {
  const size_t vocab = GetParam();
  DocStore store(vocab);
  Batch b;
  b.push(1, {1, 2, 3});
  b.add_to(store);
  const std::map<uint64_t, Doc> want = {{1, {1, 2, 3}}};
  for (int64_t bad : {int64_t(vocab), int64_t(vocab) + 70000, int64_t{-1}, int64_t{1} << 40}) {
    Batch nb;
    nb.push(2, {4, 5});
    nb.push(1, {6, bad, 7});  // a replace that must not happen either
    EXPECT_THROW(nb.add_to(store), std::invalid_argument) << bad;
    expect_contents(store, want);
    EXPECT_EQ(store.arena_tokens(), 3u);
  }
}

TEST_P(DocStoreWidth, BadOffsetsChangeNothing) {
  DocStore store(GetParam());
  Batch b;
  b.push(1, {1, 2, 3});
  b.add_to(store);
  const std::map<uint64_t, Doc> want = {{1, {1, 2, 3}}};

  const uint64_t ids[2] = {2, 3};
  const int64_t flat[4] = {1, 2, 3, 4};
  const std::vector<std::vector<int64_t>> bad_offsets = {
      {1, 2, 4},   // does not start at 0
      {0, 3, 2},   // decreasing
      {0, 2, 3},   // ends before the tokens do
      {0, 2, 5},   // ends after them
      {0, -1, 4},  // negative
  };
  for (const auto& offsets : bad_offsets) {
    EXPECT_THROW(store.add(ids, 2, flat, 4, offsets.data()), std::invalid_argument)
        << offsets[0] << "," << offsets[1] << "," << offsets[2];
    expect_contents(store, want);
  }
  // An empty batch is fine.
  const int64_t zero = 0;
  store.add(nullptr, 0, nullptr, 0, &zero);
  expect_contents(store, want);
}

TEST_P(DocStoreWidth, SaveLoadRoundTrip) {
  const size_t vocab = GetParam();
  TempDir dir;
  std::mt19937 rng(31);
  DocStore store(vocab);
  std::map<uint64_t, Doc> want;
  Batch b;
  for (uint64_t id = 0; id < 300; ++id) {
    Doc d = random_doc(rng, id % 37, vocab);
    b.push(id * 3 + 1, d);
    want[id * 3 + 1] = d;
  }
  b.add_to(store);
  Batch r;  // replaced documents leave garbage that the file must not carry
  for (uint64_t id = 1; id < 100; id += 3) {
    Doc d = random_doc(rng, 5, vocab);
    r.push(id, d);
    want[id] = d;
  }
  r.add_to(store);
  const uint64_t gone[2] = {4, 7};
  store.remove(gone, 2);
  want.erase(4);
  want.erase(7);

  const std::string path = dir.file("docs.trd");
  store.save(path);
  auto loaded = DocStore::load(path);
  EXPECT_EQ(loaded->vocab_size(), vocab);
  EXPECT_EQ(loaded->wide(), store.wide());
  expect_contents(*loaded, want);
  size_t live = 0;
  for (const auto& kv : want) live += kv.second.size();
  EXPECT_EQ(loaded->arena_tokens(), live);

  // Saving the loaded store gives the same bytes.
  loaded->save(dir.file("again.trd"));
  EXPECT_EQ(read_file(dir.file("again.trd")), read_file(path));
}

TEST_P(DocStoreWidth, SaveLoadEmpty) {
  TempDir dir;
  DocStore store(GetParam());
  store.save(dir.file("empty.trd"));
  auto loaded = DocStore::load(dir.file("empty.trd"));
  EXPECT_EQ(loaded->size(), 0u);
  EXPECT_EQ(loaded->vocab_size(), GetParam());

  // Only empty documents: a file with records but no tokens.
  Batch b;
  b.push(5, {});
  b.add_to(store);
  store.save(dir.file("blank.trd"));
  expect_contents(*DocStore::load(dir.file("blank.trd")), {{5, {}}});
}

TEST_P(DocStoreWidth, LoadRejectsDamagedFiles) {
  const size_t vocab = GetParam();
  TempDir dir;
  std::mt19937 rng(32);
  DocStore store(vocab);
  Batch b;
  for (uint64_t id = 0; id < 50; ++id) b.push(id, random_doc(rng, 20, vocab));
  b.add_to(store);
  const std::string good_path = dir.file("good.trd");
  store.save(good_path);
  const std::vector<char> good = read_file(good_path);
  for (const auto& [what, bytes] : testing::damaged_copies(good)) {
    const std::string path = dir.file("bad.trd");
    testing::write_bytes(path, bytes);
    EXPECT_THROW(DocStore::load(path), CorruptFileError) << what;
  }
  EXPECT_THROW(DocStore::load(dir.file("missing.trd")), CorruptFileError);

  // An index file is not a DocStore.
  VectorIndex index(4, Metric::kL2);
  const float v[4] = {1, 2, 3, 4};
  const uint64_t id = 9;
  index.add(v, &id, 1);
  index.save(dir.file("index.tri"));
  EXPECT_THROW(DocStore::load(dir.file("index.tri")), CorruptFileError);
  EXPECT_NO_THROW(DocStore::load(good_path));
}

TEST_P(DocStoreWidth, CompactionKeepsContents) {
  // Replace and remove documents until the arena passes 1M tokens with more garbage than live
  // tokens; compaction must kick in and every document must still read back right.
  const size_t vocab = GetParam();
  std::mt19937 rng(33);
  std::uniform_int_distribution<size_t> len(200, 1800);
  DocStore store(vocab);
  std::map<uint64_t, Doc> want;
  size_t compactions = 0;
  size_t prev_arena = 0;
  auto check_invariants = [&] {
    size_t arena = store.arena_tokens();
    size_t live = 0;
    for (const auto& kv : want) live += kv.second.size();
    EXPECT_TRUE(arena <= (size_t{1} << 20) || arena <= 2 * live) << "arena " << arena << " live " << live;
    EXPECT_GE(arena, live);
    if (arena < prev_arena) ++compactions;
    prev_arena = arena;
  };
  for (int round = 0; round < 12; ++round) {
    Batch b;
    for (uint64_t id = 0; id < 200; ++id) {
      if ((id + round) % 4 == 0) continue;  // not every document every round
      Doc d = random_doc(rng, len(rng), vocab);
      b.push(id, d);
      want[id] = d;
    }
    b.add_to(store);
    check_invariants();
    if (round % 3 == 1) {
      std::vector<uint64_t> gone;
      for (const auto& kv : want)
        if (kv.first % 7 == uint64_t(round % 7)) gone.push_back(kv.first);
      store.remove(gone.data(), gone.size());
      for (uint64_t id : gone) want.erase(id);
      check_invariants();
    }
  }
  EXPECT_GE(compactions, 1u);
  expect_contents(store, want);
}

INSTANTIATE_TEST_SUITE_P(Widths, DocStoreWidth, ::testing::Values(size_t{30522}, size_t{250002}),
                         [](const auto& info) { return info.param > 65536 ? "int32" : "uint16"; });

}  // namespace
}  // namespace tailrank
