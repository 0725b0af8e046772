// Tests for PairAssembler (templates, truncation, batching, buffers) and retrieve_and_assemble.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "doc_store.hpp"
#include "fused.hpp"
#include "index.hpp"
#include "pairs.hpp"

namespace tailrank {
namespace {

using Tokens = std::vector<int32_t>;

/// [CLS] q [SEP] d [SEP], token types 0 for the query part and 1 for the document part.
PairTemplate bert_template() {
  PairTemplate t;
  t.pieces = {{TemplatePiece::kSpecial, 101, 0}, {TemplatePiece::kSeqA, 0, 0}, {TemplatePiece::kSpecial, 102, 0},
              {TemplatePiece::kSeqB, 0, 1},      {TemplatePiece::kSpecial, 102, 1}};
  t.pad_id = 0;
  return t;
}

/// <s> q </s> </s> d </s>, all token types 0, padded with 1.
PairTemplate roberta_template() {
  PairTemplate t;
  t.pieces = {{TemplatePiece::kSpecial, 0, 0}, {TemplatePiece::kSeqA, 0, 0}, {TemplatePiece::kSpecial, 2, 0},
              {TemplatePiece::kSpecial, 2, 0}, {TemplatePiece::kSeqB, 0, 0}, {TemplatePiece::kSpecial, 2, 0}};
  t.pad_id = 1;
  return t;
}

AssemblerOptions options(size_t max_length, Truncation truncation = Truncation::kLongestFirst,
                         size_t batch_tokens = 16384, size_t max_batch_rows = 256, bool int32 = false) {
  AssemblerOptions o;
  o.max_length = max_length;
  o.truncation = truncation;
  o.batch_tokens = batch_tokens;
  o.max_batch_rows = max_batch_rows;
  o.int32 = int32;
  return o;
}

std::vector<TokenView> views(const std::vector<Tokens>& docs) {
  std::vector<TokenView> out;
  for (const auto& d : docs) {
    TokenView v;
    v.i32 = d.data();
    v.size = d.size();
    out.push_back(v);
  }
  return out;
}

/// One assembled row (unpadded tensors are compared with their padding).
struct Row {
  std::vector<int64_t> ids, mask, types;
  bool operator==(const Row& o) const { return ids == o.ids && mask == o.mask && types == o.types; }
};

std::ostream& operator<<(std::ostream& os, const Row& r) {
  auto put = [&](const char* name, const std::vector<int64_t>& v) {
    os << name << "=[";
    for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
    os << "] ";
  };
  put("ids", r.ids);
  put("mask", r.mask);
  put("types", r.types);
  return os;
}

/// Reads row `r` (in the assembler's row order) out of its buffers.
Row read_row(const PairAssembler& a, size_t r) {
  for (const BatchSpec& b : a.batches()) {
    if (r < b.row_start || r >= b.row_start + b.rows) continue;
    size_t base = b.offset + (r - b.row_start) * b.seq_len;
    Row row;
    auto get = [&](void* buf, std::vector<int64_t>& out) {
      for (size_t i = 0; i < b.seq_len; ++i)
        out.push_back(a.options().int32 ? static_cast<const int32_t*>(buf)[base + i]
                                        : static_cast<const int64_t*>(buf)[base + i]);
    };
    get(a.input_ids()->data(), row.ids);
    get(a.attention_mask()->data(), row.mask);
    get(a.token_type_ids()->data(), row.types);
    return row;
  }
  ADD_FAILURE() << "row " << r << " is in no batch";
  return {};
}

/// The row of candidate `cand` (input order).
Row row_of_candidate(const PairAssembler& a, size_t cand) {
  const auto& order = a.order();
  auto it = std::find(order.begin(), order.end(), int64_t(cand));
  if (it == order.end()) {
    ADD_FAILURE() << "candidate " << cand << " not in order()";
    return {};
  }
  return read_row(a, size_t(it - order.begin()));
}

/// Reference assembly of one pair from the template, independent of the assembler's code; `ends`
/// keeps the last tokens of each sequence (left truncation) instead of the first.
Row expected_row(const PairTemplate& t, const Tokens& q, const Tokens& d, size_t keep_q, size_t keep_d,
                 size_t seq_len, bool ends = false) {
  Row row;
  for (const TemplatePiece& p : t.pieces) {
    if (p.kind == TemplatePiece::kSpecial) {
      row.ids.push_back(p.token_id);
      row.types.push_back(p.type_id);
    } else {
      const Tokens& s = p.kind == TemplatePiece::kSeqA ? q : d;
      size_t keep = p.kind == TemplatePiece::kSeqA ? keep_q : keep_d;
      size_t from = ends ? s.size() - keep : 0;
      for (size_t i = from; i < from + keep; ++i) {
        row.ids.push_back(s[i]);
        row.types.push_back(p.type_id);
      }
    }
  }
  row.mask.assign(row.ids.size(), 1);
  row.ids.resize(seq_len, t.pad_id);
  row.types.resize(seq_len, 0);
  row.mask.resize(seq_len, 0);
  return row;
}

/// Hugging Face tokenizers' truncate_encodings for a pair, written out from its rules.
std::pair<size_t, size_t> hf_truncate(size_t n1, size_t n2, size_t max_length, size_t n_special, Truncation t,
                                      bool* error) {
  *error = false;
  size_t max = max_length - n_special;
  if (n1 + n2 <= max) return {n1, n2};
  if (t == Truncation::kOnlySecond) {
    size_t to_remove = n1 + n2 - max;
    if (n2 <= to_remove) {
      *error = true;
      return {0, 0};
    }
    return {n1, n2 - to_remove};
  }
  size_t a = std::min(n1, n2), b = std::max(n1, n2);
  if (a > max)
    b = a;
  else
    b = std::max(a, max - a);
  if (a + b > max) {
    a = max / 2;
    b = a + max % 2;
  }
  if (n1 > n2) std::swap(a, b);
  return {std::min(a, n1), std::min(b, n2)};
}

// ---------------------------------------------------------------------------------------------

TEST(PairTemplate, Validation) {
  EXPECT_EQ(bert_template().n_special(), 3u);
  EXPECT_EQ(roberta_template().n_special(), 4u);
  EXPECT_NO_THROW(bert_template().validate());

  PairTemplate no_b = bert_template();
  no_b.pieces.erase(no_b.pieces.begin() + 3);
  EXPECT_THROW(no_b.validate(), std::invalid_argument);
  PairTemplate two_a = bert_template();
  two_a.pieces.push_back({TemplatePiece::kSeqA, 0, 0});
  EXPECT_THROW(two_a.validate(), std::invalid_argument);
  PairTemplate negative = bert_template();
  negative.pieces[0].token_id = -5;
  EXPECT_THROW(negative.validate(), std::invalid_argument);
  EXPECT_THROW(PairAssembler(no_b, options(16)), std::invalid_argument);

  EXPECT_THROW(PairAssembler(bert_template(), options(3)), std::invalid_argument);  // no room for text
  EXPECT_NO_THROW(PairAssembler(bert_template(), options(4)));
  EXPECT_THROW(PairAssembler(bert_template(), options(64, Truncation::kLongestFirst, 63)), std::invalid_argument);
  EXPECT_THROW(PairAssembler(bert_template(), options(64, Truncation::kLongestFirst, 64, 0)), std::invalid_argument);
}

TEST(PairAssembler, BertHandExample) {
  PairAssembler a(bert_template(), options(512));
  const Tokens q = {7592, 2088};                              // "hello world"
  const std::vector<Tokens> docs = {{2023}, {1996, 4937, 2003}};  // shorter first
  const auto& batches = a.assemble(q.data(), q.size(), views(docs));
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].row_start, 0u);
  EXPECT_EQ(batches[0].rows, 2u);
  EXPECT_EQ(batches[0].seq_len, 8u);
  EXPECT_EQ(batches[0].offset, 0u);
  EXPECT_EQ(a.total_elements(), 16u);
  EXPECT_EQ(a.element_size(), 8u);
  EXPECT_EQ(a.order(), (std::vector<int64_t>{1, 0}));  // longest first
  EXPECT_EQ(a.lengths(), (std::vector<int64_t>{6, 8}));
  EXPECT_EQ(a.truncated(), (std::vector<uint8_t>{0, 0}));

  Row r0 = read_row(a, 0), r1 = read_row(a, 1);
  EXPECT_EQ(r0.ids, (std::vector<int64_t>{101, 7592, 2088, 102, 1996, 4937, 2003, 102}));
  EXPECT_EQ(r0.types, (std::vector<int64_t>{0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(r0.mask, (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(r1.ids, (std::vector<int64_t>{101, 7592, 2088, 102, 2023, 102, 0, 0}));
  EXPECT_EQ(r1.types, (std::vector<int64_t>{0, 0, 0, 0, 1, 1, 0, 0}));
  EXPECT_EQ(r1.mask, (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 0, 0}));
}

TEST(PairAssembler, RobertaHandExample) {
  PairAssembler a(roberta_template(), options(512));
  const Tokens q = {31414, 232};
  const std::vector<Tokens> docs = {{9, 10, 11}, {}, {12}};
  a.assemble(q.data(), q.size(), views(docs));
  EXPECT_EQ(a.order(), (std::vector<int64_t>{0, 2, 1}));
  ASSERT_EQ(a.batches().size(), 1u);
  EXPECT_EQ(a.batches()[0].seq_len, 9u);

  Row r0 = read_row(a, 0), r1 = read_row(a, 1), r2 = read_row(a, 2);
  EXPECT_EQ(r0.ids, (std::vector<int64_t>{0, 31414, 232, 2, 2, 9, 10, 11, 2}));
  EXPECT_EQ(r0.mask, (std::vector<int64_t>(9, 1)));
  EXPECT_EQ(r1.ids, (std::vector<int64_t>{0, 31414, 232, 2, 2, 12, 2, 1, 1}));
  EXPECT_EQ(r1.mask, (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 1, 0, 0}));
  EXPECT_EQ(r2.ids, (std::vector<int64_t>{0, 31414, 232, 2, 2, 2, 1, 1, 1}));
  EXPECT_EQ(r2.mask, (std::vector<int64_t>{1, 1, 1, 1, 1, 1, 0, 0, 0}));
  for (const Row& r : {r0, r1, r2}) EXPECT_EQ(r.types, std::vector<int64_t>(9, 0));
}

TEST(PairAssembler, TruncationHandExamples) {
  const Tokens q = {1, 2, 3, 4, 5};
  const std::vector<Tokens> docs = {{11, 12, 13, 14, 15, 16}};
  {
    // max_length 10 leaves 7: longest_first keeps 3 of the query and 4 of the document.
    PairAssembler a(bert_template(), options(10));
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(read_row(a, 0).ids, (std::vector<int64_t>{101, 1, 2, 3, 102, 11, 12, 13, 14, 102}));
    EXPECT_EQ(a.lengths(), (std::vector<int64_t>{10}));
    EXPECT_EQ(a.truncated(), (std::vector<uint8_t>{1}));
  }
  {
    // only_second removes all 4 extra tokens from the document.
    PairAssembler a(bert_template(), options(10, Truncation::kOnlySecond));
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(read_row(a, 0).ids, (std::vector<int64_t>{101, 1, 2, 3, 4, 5, 102, 11, 12, 102}));
    EXPECT_EQ(a.truncated(), (std::vector<uint8_t>{1}));
    // A query that leaves no room is an error, as in tokenizers; the assembler stays usable.
    const Tokens long_q(7, 42);
    EXPECT_THROW(a.assemble(long_q.data(), long_q.size(), views(docs)), std::invalid_argument);
    EXPECT_NO_THROW(a.assemble(q.data(), q.size(), views(docs)));
  }
}

TEST(PairAssembler, LeftTruncationHandExamples) {
  // The same counts as TruncationHandExamples, taken from the ends (tokenizers' truncation_side "left").
  const Tokens q = {1, 2, 3, 4, 5};
  const std::vector<Tokens> docs = {{11, 12, 13, 14, 15, 16}, {21, 22}};
  {
    AssemblerOptions o = options(10);
    o.side = TruncationSide::kLeft;
    PairAssembler a(bert_template(), o);
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(row_of_candidate(a, 0).ids, (std::vector<int64_t>{101, 3, 4, 5, 102, 13, 14, 15, 16, 102}));
    // A pair that fits is whole whatever the side.
    EXPECT_EQ(row_of_candidate(a, 1).ids, (std::vector<int64_t>{101, 1, 2, 3, 4, 5, 102, 21, 22, 102}));
    EXPECT_EQ(a.lengths(), (std::vector<int64_t>{10, 10}));
    EXPECT_EQ(a.truncated(), (std::vector<uint8_t>{1, 0}));
  }
  {
    AssemblerOptions o = options(10, Truncation::kOnlySecond);
    o.side = TruncationSide::kLeft;
    PairAssembler a(bert_template(), o);
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(row_of_candidate(a, 0).ids, (std::vector<int64_t>{101, 1, 2, 3, 4, 5, 102, 15, 16, 102}));
  }
  {
    // Per pair in one assembly: candidate 0 keeps ends, candidate 1 (the same pair) starts.
    PairAssembler a(bert_template(), options(10));
    const std::vector<Tokens> same = {docs[0], docs[0]};
    const std::vector<Tokens> qs = {q};
    std::vector<int64_t> qi = {0, 0};
    std::vector<uint8_t> ends = {1, 0};
    a.assemble_multi(views(qs), qi.data(), views(same), ends.data());
    EXPECT_EQ(row_of_candidate(a, 0).ids, (std::vector<int64_t>{101, 3, 4, 5, 102, 13, 14, 15, 16, 102}));
    EXPECT_EQ(row_of_candidate(a, 1).ids, (std::vector<int64_t>{101, 1, 2, 3, 102, 11, 12, 13, 14, 102}));
  }
}

TEST(PairAssembler, TruncateLengthsMatchesTokenizers) {
  // Values worked out by hand from tokenizers' rules, BERT template, max_length 512 (509 free).
  PairAssembler lf(bert_template(), options(512));
  EXPECT_EQ(lf.truncate_lengths(10, 600), std::make_pair(size_t{10}, size_t{499}));
  EXPECT_EQ(lf.truncate_lengths(600, 10), std::make_pair(size_t{499}, size_t{10}));
  EXPECT_EQ(lf.truncate_lengths(300, 300), std::make_pair(size_t{254}, size_t{255}));
  EXPECT_EQ(lf.truncate_lengths(600, 700), std::make_pair(size_t{254}, size_t{255}));
  EXPECT_EQ(lf.truncate_lengths(700, 600), std::make_pair(size_t{255}, size_t{254}));
  EXPECT_EQ(lf.truncate_lengths(0, 1000), std::make_pair(size_t{0}, size_t{509}));
  EXPECT_EQ(lf.truncate_lengths(200, 309), std::make_pair(size_t{200}, size_t{309}));
  PairAssembler os(bert_template(), options(512, Truncation::kOnlySecond));
  EXPECT_EQ(os.truncate_lengths(10, 600), std::make_pair(size_t{10}, size_t{499}));
  EXPECT_EQ(os.truncate_lengths(508, 5), std::make_pair(size_t{508}, size_t{1}));
  EXPECT_THROW(os.truncate_lengths(509, 5), std::invalid_argument);
  EXPECT_THROW(os.truncate_lengths(600, 0), std::invalid_argument);

  // Exhaustively against the rules, for both templates and several lengths.
  for (const PairTemplate& t : {bert_template(), roberta_template()}) {
    for (size_t max_length : {t.n_special() + 1, size_t{10}, size_t{17}, size_t{32}}) {
      for (Truncation tr : {Truncation::kLongestFirst, Truncation::kOnlySecond}) {
        PairAssembler a(t, options(max_length, tr));
        for (size_t n1 = 0; n1 <= 40; ++n1) {
          for (size_t n2 = 0; n2 <= 40; ++n2) {
            bool error;
            auto want = hf_truncate(n1, n2, max_length, t.n_special(), tr, &error);
            SCOPED_TRACE("max_length " + std::to_string(max_length) + " n1 " + std::to_string(n1) + " n2 " +
                         std::to_string(n2) + (tr == Truncation::kOnlySecond ? " only_second" : " longest_first"));
            if (error) {
              EXPECT_THROW(a.truncate_lengths(n1, n2), std::invalid_argument);
              continue;
            }
            auto got = a.truncate_lengths(n1, n2);
            EXPECT_EQ(got, want);
            EXPECT_LE(got.first, n1);
            EXPECT_LE(got.second, n2);
            EXPECT_LE(got.first + got.second, max_length - t.n_special());
          }
        }
      }
    }
  }
}

/// Checks the batch layout rules and every row's contents against the reference assembly;
/// candidate i pairs queries[query_index[i]].
/// `keep_ends`: the per-pair sides the assembly was given (null: the assembler's side option).
void check_assembly_multi(const PairAssembler& a, const std::vector<Tokens>& queries,
                          const std::vector<int64_t>& query_index, const std::vector<Tokens>& docs,
                          const std::vector<uint8_t>* keep_ends = nullptr) {
  const size_t n = docs.size();
  const AssemblerOptions& o = a.options();
  ASSERT_EQ(a.order().size(), n);
  ASSERT_EQ(a.lengths().size(), n);
  ASSERT_EQ(a.truncated().size(), n);

  std::vector<int64_t> sorted = a.order();
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity) << "order() is not a permutation";

  for (size_t r = 1; r < n; ++r) {
    int64_t prev = a.order()[r - 1], cur = a.order()[r];
    ASSERT_GE(a.lengths()[prev], a.lengths()[cur]) << "rows not longest-first at " << r;
    if (a.lengths()[prev] == a.lengths()[cur]) {
      EXPECT_LT(prev, cur) << "ties not in input order";
    }
  }

  size_t row = 0, offset = 0;
  for (const BatchSpec& b : a.batches()) {
    EXPECT_EQ(b.row_start, row);
    EXPECT_EQ(b.offset, offset);
    ASSERT_GE(b.rows, 1u);
    EXPECT_LE(b.rows, o.max_batch_rows);
    EXPECT_LE(b.rows * b.seq_len, o.batch_tokens);
    EXPECT_EQ(size_t(a.lengths()[a.order()[b.row_start]]), b.seq_len) << "batch not padded to its first row";
    // Greedy: a batch stops only at a limit or at the end.
    size_t fit = b.seq_len ? o.batch_tokens / b.seq_len : o.max_batch_rows;
    EXPECT_EQ(b.rows, std::min({n - b.row_start, o.max_batch_rows, fit}));
    row += b.rows;
    offset += b.rows * b.seq_len;
  }
  EXPECT_EQ(row, n);
  EXPECT_EQ(a.total_elements(), offset);
  EXPECT_GE(a.buffer_bytes(), 3 * offset * a.element_size());

  for (size_t cand = 0; cand < n; ++cand) {
    const Tokens& q = queries[size_t(query_index[cand])];
    bool error;
    auto keep = hf_truncate(q.size(), docs[cand].size(), o.max_length, a.pair_template().n_special(), o.truncation,
                            &error);
    ASSERT_FALSE(error);
    size_t len = keep.first + keep.second + a.pair_template().n_special();
    EXPECT_EQ(size_t(a.lengths()[cand]), len);
    EXPECT_EQ(bool(a.truncated()[cand]), keep.first < q.size() || keep.second < docs[cand].size());
    size_t r = size_t(std::find(a.order().begin(), a.order().end(), int64_t(cand)) - a.order().begin());
    size_t seq_len = 0;
    for (const BatchSpec& b : a.batches())
      if (r >= b.row_start && r < b.row_start + b.rows) seq_len = b.seq_len;
    bool ends = keep_ends ? (*keep_ends)[cand] != 0 : o.side == TruncationSide::kLeft;
    Row want = expected_row(a.pair_template(), q, docs[cand], keep.first, keep.second, seq_len, ends);
    ASSERT_EQ(read_row(a, r), want) << "candidate " << cand;
  }
}

/// The single-query case: every candidate pairs `q`.
void check_assembly(const PairAssembler& a, const Tokens& q, const std::vector<Tokens>& docs) {
  check_assembly_multi(a, {q}, std::vector<int64_t>(docs.size(), 0), docs);
}

std::vector<Tokens> random_docs(std::mt19937& rng, size_t n, size_t max_len, int32_t vocab) {
  std::uniform_int_distribution<size_t> len(0, max_len);
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::vector<Tokens> docs(n);
  for (auto& d : docs) {
    d.resize(len(rng));
    for (auto& t : d) t = tok(rng);
  }
  return docs;
}

TEST(PairAssembler, BatchingRules) {
  std::mt19937 rng(41);
  Tokens q(17);
  for (auto& t : q) t = int32_t(rng() % 30000);
  auto docs = random_docs(rng, 300, 200, 30000);
  for (Truncation tr : {Truncation::kLongestFirst, Truncation::kOnlySecond}) {
    for (const PairTemplate& t : {bert_template(), roberta_template()}) {
      for (auto [batch_tokens, rows] : {std::pair<size_t, size_t>{1000, 16}, {128, 256}, {100000, 7}}) {
        PairAssembler a(t, options(128, tr, batch_tokens, rows));
        a.assemble(q.data(), q.size(), views(docs));
        SCOPED_TRACE("batch_tokens " + std::to_string(batch_tokens) + " rows " + std::to_string(rows));
        check_assembly(a, q, docs);
      }
    }
  }
}

TEST(PairAssembler, EmptyInputs) {
  PairAssembler a(bert_template(), options(64));
  const Tokens q = {5, 6};
  const auto& none = a.assemble(q.data(), q.size(), {});
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(a.total_elements(), 0u);
  EXPECT_TRUE(a.order().empty());

  // An empty query and empty documents give just the special tokens.
  const std::vector<Tokens> docs = {{}, {}};
  a.assemble(nullptr, 0, views(docs));
  EXPECT_EQ(a.lengths(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(read_row(a, 0).ids, (std::vector<int64_t>{101, 102, 102}));
  EXPECT_EQ(read_row(a, 1).types, (std::vector<int64_t>{0, 0, 1}));
}

TEST(PairAssembler, TemplateWithoutSpecialTokens) {
  // A template of just the two sequences: an empty query and document make a zero-length row.
  PairTemplate bare;
  bare.pieces = {{TemplatePiece::kSeqA, 0, 0}, {TemplatePiece::kSeqB, 0, 1}};
  PairAssembler a(bare, options(8, Truncation::kLongestFirst, 16, 4));
  const std::vector<Tokens> docs = {{}, {}, {5}, {}, {}, {}, {}};
  a.assemble(nullptr, 0, views(docs));
  EXPECT_EQ(a.lengths(), (std::vector<int64_t>{0, 0, 1, 0, 0, 0, 0}));
  check_assembly(a, {}, docs);
  EXPECT_EQ(read_row(a, 0).ids, (std::vector<int64_t>{5}));
  EXPECT_EQ(read_row(a, 0).types, (std::vector<int64_t>{1}));
}

TEST(PairAssembler, Int32Option) {
  std::mt19937 rng(42);
  Tokens q = {3, 1, 4, 1, 5};
  auto docs = random_docs(rng, 40, 60, 250000);
  PairAssembler wide(bert_template(), options(48, Truncation::kLongestFirst, 200, 8, /*int32=*/false));
  PairAssembler narrow(bert_template(), options(48, Truncation::kLongestFirst, 200, 8, /*int32=*/true));
  wide.assemble(q.data(), q.size(), views(docs));
  narrow.assemble(q.data(), q.size(), views(docs));
  EXPECT_EQ(narrow.element_size(), 4u);
  check_assembly(narrow, q, docs);
  ASSERT_EQ(narrow.total_elements(), wide.total_elements());
  const auto* i32 = static_cast<const int32_t*>(narrow.input_ids()->data());
  const auto* i64 = static_cast<const int64_t*>(wide.input_ids()->data());
  const auto* m32 = static_cast<const int32_t*>(narrow.attention_mask()->data());
  const auto* m64 = static_cast<const int64_t*>(wide.attention_mask()->data());
  for (size_t i = 0; i < wide.total_elements(); ++i) {
    ASSERT_EQ(int64_t(i32[i]), i64[i]) << i;
    ASSERT_EQ(int64_t(m32[i]), m64[i]) << i;
  }
}

TEST(PairAssembler, BuffersReusedForSameOrSmallerCalls) {
  std::mt19937 rng(43);
  Tokens q = {1, 2, 3};
  auto docs = random_docs(rng, 50, 100, 1000);
  PairAssembler a(bert_template(), options(128));
  a.assemble(q.data(), q.size(), views(docs));
  void* ids = a.input_ids()->data();
  void* mask = a.attention_mask()->data();
  void* types = a.token_type_ids()->data();
  size_t bytes = a.buffer_bytes();

  a.assemble(q.data(), q.size(), views(docs));  // same size
  EXPECT_EQ(a.input_ids()->data(), ids);
  EXPECT_EQ(a.attention_mask()->data(), mask);
  EXPECT_EQ(a.token_type_ids()->data(), types);
  std::vector<Tokens> fewer(docs.begin(), docs.begin() + 10);
  a.assemble(q.data(), q.size(), views(fewer));  // smaller
  EXPECT_EQ(a.input_ids()->data(), ids);
  EXPECT_EQ(a.buffer_bytes(), bytes);
  check_assembly(a, q, fewer);

  auto more = random_docs(rng, 400, 120, 1000);  // larger: may move, must still be right
  a.assemble(q.data(), q.size(), views(more));
  check_assembly(a, q, more);
  EXPECT_GE(a.buffer_bytes(), bytes);
}

TEST(PairAssembler, HeldBuffersStayValidAndUnchanged) {
  std::mt19937 rng(44);
  Tokens q = {1, 2, 3};
  auto small = random_docs(rng, 30, 50, 1000);
  auto big = random_docs(rng, 300, 120, 1000);
  PairAssembler a(bert_template(), options(128));
  a.assemble(q.data(), q.size(), views(small));
  std::shared_ptr<Buffer> held = a.input_ids();  // what a numpy array's base holds
  size_t n = a.total_elements();
  std::vector<int64_t> before(static_cast<const int64_t*>(held->data()), static_cast<const int64_t*>(held->data()) + n);
  a.assemble(q.data(), q.size(), views(big));  // must not write into, move or free `held`
  EXPECT_NE(a.input_ids().get(), held.get());
  EXPECT_EQ(std::memcmp(held->data(), before.data(), n * sizeof(int64_t)), 0);
  check_assembly(a, q, big);
  // Dropped by its holder: the next assembly reuses the assembler's own buffer again.
  held.reset();
  void* own = a.input_ids()->data();
  a.assemble(q.data(), q.size(), views(small));
  EXPECT_EQ(a.input_ids()->data(), own);
}

struct CountingAllocator {
  int allocs = 0, frees = 0;
  static void* alloc(size_t bytes, void* ctx) {
    ++static_cast<CountingAllocator*>(ctx)->allocs;
    return std::malloc(bytes == 0 ? 1 : bytes);
  }
  static void free(void* p, void* ctx) {
    ++static_cast<CountingAllocator*>(ctx)->frees;
    std::free(p);
  }
};

TEST(PairAssembler, LastResultHeldDuringTheNextCallAllocatesNothingOnceWarm) {
  // `a = assemble(...)` in a loop keeps the previous arrays alive during each call: the spare
  // buffer takes turns with the held one instead of a fresh allocation per call.
  std::mt19937 rng(45);
  Tokens q = {1, 2, 3};
  auto docs = random_docs(rng, 40, 60, 1000);
  CountingAllocator ca;
  {
    PairAssembler a(bert_template(), options(128));
    a.set_allocator(Allocator{&CountingAllocator::alloc, &CountingAllocator::free, &ca});
    std::shared_ptr<Buffer> held, held_mask, held_types;
    std::vector<const Buffer*> seen;
    for (int call = 0; call < 8; ++call) {
      a.assemble(q.data(), q.size(), views(docs));
      check_assembly(a, q, docs);
      EXPECT_NE(a.input_ids().get(), held.get());  // never the one still held
      held = a.input_ids();                        // the caller keeps this result until the next one
      held_mask = a.attention_mask();
      held_types = a.token_type_ids();
      seen.push_back(held.get());
    }
    EXPECT_EQ(ca.allocs, 6);  // ids, mask and types, twice; then the two sets alternate
    EXPECT_EQ(seen[2], seen[0]);
    EXPECT_EQ(seen[3], seen[1]);
    EXPECT_EQ(ca.frees, 0);
  }
  EXPECT_EQ(ca.frees, ca.allocs);
}

/// An allocator that, while the assembler is mid-assembly, tries to use the same assembler again.
struct ReentrantAllocator {
  PairAssembler* assembler = nullptr;
  int allocs = 0, frees = 0, refused = 0;

  static void* alloc(size_t bytes, void* ctx) {
    auto* self = static_cast<ReentrantAllocator*>(ctx);
    ++self->allocs;
    const Tokens q = {1};
    try {
      self->assembler->assemble(q.data(), q.size(), {});
    } catch (const ConcurrentUseError&) {
      ++self->refused;
    }
    return std::malloc(bytes == 0 ? 1 : bytes);
  }
  static void free(void* p, void* ctx) {
    ++static_cast<ReentrantAllocator*>(ctx)->frees;
    std::free(p);
  }
};

TEST(PairAssembler, SecondConcurrentUseThrows) {
  ReentrantAllocator ra;
  {
    PairAssembler a(bert_template(), options(64));
    ra.assembler = &a;
    a.set_allocator(Allocator{&ReentrantAllocator::alloc, &ReentrantAllocator::free, &ra});
    const Tokens q = {7, 8};
    const std::vector<Tokens> docs = {{1, 2, 3}, {4}};
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(ra.allocs, 3);  // ids, mask, types
    EXPECT_EQ(ra.refused, 3) << "assemble inside assemble must throw ConcurrentUseError";
    check_assembly(a, q, docs);
    // The first call released the assembler: it works again, and the buffers are reused.
    ra.assembler = nullptr;
    a.assemble(q.data(), q.size(), views(docs));
    EXPECT_EQ(ra.allocs, 3);
    check_assembly(a, q, docs);
  }
  EXPECT_EQ(ra.frees, 3);
}

// ---------------------------------------------------------------------------------------------
// DocStore-backed assembly and the fused call

std::unique_ptr<DocStore> make_store(size_t vocab, const std::map<uint64_t, Tokens>& docs) {
  auto store = std::make_unique<DocStore>(vocab);
  std::vector<uint64_t> ids;
  std::vector<int64_t> flat, offsets{0};
  for (const auto& [id, d] : docs) {
    ids.push_back(id);
    flat.insert(flat.end(), d.begin(), d.end());
    offsets.push_back(int64_t(flat.size()));
  }
  store->add(ids.data(), ids.size(), flat.data(), flat.size(), offsets.data());
  return store;
}

/// Same batches, order, lengths and buffer contents.
void expect_same_assembly(const PairAssembler& a, const PairAssembler& b) {
  ASSERT_EQ(a.order(), b.order());
  EXPECT_EQ(a.lengths(), b.lengths());
  EXPECT_EQ(a.truncated(), b.truncated());
  ASSERT_EQ(a.batches().size(), b.batches().size());
  for (size_t i = 0; i < a.batches().size(); ++i) {
    EXPECT_EQ(a.batches()[i].rows, b.batches()[i].rows);
    EXPECT_EQ(a.batches()[i].seq_len, b.batches()[i].seq_len);
    EXPECT_EQ(a.batches()[i].offset, b.batches()[i].offset);
  }
  ASSERT_EQ(a.total_elements(), b.total_elements());
  size_t bytes = a.total_elements() * a.element_size();
  EXPECT_EQ(std::memcmp(a.input_ids()->data(), b.input_ids()->data(), bytes), 0);
  EXPECT_EQ(std::memcmp(a.attention_mask()->data(), b.attention_mask()->data(), bytes), 0);
  EXPECT_EQ(std::memcmp(a.token_type_ids()->data(), b.token_type_ids()->data(), bytes), 0);
}

TEST(PairAssembler, FromStoreEqualsAssemble) {
  std::mt19937 rng(44);
  for (size_t vocab : {size_t{30522}, size_t{250002}}) {
    auto random = random_docs(rng, 80, 90, int32_t(vocab));
    std::map<uint64_t, Tokens> by_id;
    for (size_t i = 0; i < random.size(); ++i) by_id[1000 + 7 * i] = random[i];
    auto owned = make_store(vocab, by_id);
    const DocStore& store = *owned;
    ASSERT_EQ(store.wide(), vocab > 65536);

    // A subset in a scrambled order, with one id twice.
    std::vector<uint64_t> ids;
    for (size_t i = 0; i < 80; i += 3) ids.push_back(1000 + 7 * ((i * 37) % 80));
    ids.push_back(ids.front());
    std::vector<Tokens> docs;
    for (uint64_t id : ids) docs.push_back(by_id.at(id));

    Tokens q = {2054, 2003, 1037, 3899};
    for (bool int32 : {false, true}) {
      PairAssembler from_store(bert_template(), options(64, Truncation::kLongestFirst, 512, 16, int32));
      PairAssembler direct(bert_template(), options(64, Truncation::kLongestFirst, 512, 16, int32));
      from_store.assemble_from_store(q.data(), q.size(), store, ids.data(), ids.size());
      direct.assemble(q.data(), q.size(), views(docs));
      expect_same_assembly(from_store, direct);
      check_assembly(from_store, q, docs);

      std::vector<uint64_t> with_missing = ids;
      with_missing.push_back(5);
      EXPECT_THROW(from_store.assemble_from_store(q.data(), q.size(), store, with_missing.data(), with_missing.size()),
                   UnknownIdError);
      // Still usable after the error.
      from_store.assemble_from_store(q.data(), q.size(), store, ids.data(), ids.size());
      expect_same_assembly(from_store, direct);
    }
  }
}

constexpr size_t kDim = 16;

struct Corpus {
  std::vector<float> vectors;
  std::vector<uint64_t> ids;
  std::map<uint64_t, Tokens> docs;
};

Corpus make_corpus(std::mt19937& rng, size_t n) {
  Corpus c;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c.vectors.resize(n * kDim);
  for (float& x : c.vectors) x = normal(rng);
  auto docs = random_docs(rng, n, 40, 30522);
  for (size_t i = 0; i < n; ++i) {
    c.ids.push_back(500 + 3 * i);
    c.docs[c.ids.back()] = docs[i];
  }
  return c;
}

TEST(RetrieveAndAssemble, MatchesSearchAndStore) {
  std::mt19937 rng(45);
  const size_t n = 500;
  Corpus c = make_corpus(rng, n);
  VectorIndex index(kDim, Metric::kCosine, 16, 64);
  index.add(c.vectors.data(), c.ids.data(), n);
  auto owned = make_store(30522, c.docs);
  const DocStore& store = *owned;
  PairAssembler fused(bert_template(), options(48, Truncation::kLongestFirst, 256, 8));
  PairAssembler reference(bert_template(), options(48, Truncation::kLongestFirst, 256, 8));
  const Tokens q = {2129, 2000, 4521};

  std::vector<uint64_t> allowed(c.ids.begin(), c.ids.begin() + 100);
  AllowList allow(allowed);
  for (size_t k : {size_t{1}, size_t{10}, size_t{30}}) {
    for (const AllowList* al : std::vector<const AllowList*>{nullptr, &allow}) {
      SearchParams p;
      p.k = k;
      p.allow = al;
      std::vector<float> query(kDim);
      for (float& x : query) x = float(rng() % 1000) / 500.0f - 1.0f;
      std::vector<int64_t> ids(k), want_ids(k);
      std::vector<float> scores(k), want_scores(k);
      size_t hits = retrieve_and_assemble(index, store, fused, query.data(), q.data(), q.size(), p, ids.data(),
                                          scores.data());
      index.search(query.data(), 1, p, want_ids.data(), want_scores.data());
      EXPECT_EQ(hits, k);
      EXPECT_EQ(ids, want_ids);
      EXPECT_EQ(scores, want_scores);
      if (al) {
        for (int64_t id : ids) EXPECT_TRUE(al->contains(uint64_t(id)));
      }

      // The candidates are the hits, in hit order.
      std::vector<uint64_t> hit_ids(ids.begin(), ids.begin() + hits);
      reference.assemble_from_store(q.data(), q.size(), store, hit_ids.data(), hit_ids.size());
      expect_same_assembly(fused, reference);
      std::vector<Tokens> docs;
      for (uint64_t id : hit_ids) docs.push_back(c.docs.at(id));
      check_assembly(fused, q, docs);
    }
  }
}

TEST(RetrieveAndAssemble, FewerHitsThanK) {
  std::mt19937 rng(46);
  Corpus c = make_corpus(rng, 3);
  VectorIndex index(kDim, Metric::kL2);
  index.add(c.vectors.data(), c.ids.data(), 3);
  auto owned = make_store(30522, c.docs);
  const DocStore& store = *owned;
  PairAssembler a(bert_template(), options(64));
  SearchParams p;
  p.k = 5;
  std::vector<int64_t> ids(5);
  std::vector<float> scores(5);
  const Tokens q = {1, 2};
  size_t hits = retrieve_and_assemble(index, store, a, c.vectors.data(), q.data(), q.size(), p, ids.data(),
                                      scores.data());
  EXPECT_EQ(hits, 3u);
  EXPECT_EQ(ids[0], int64_t(c.ids[0]));  // the query is the first vector itself
  EXPECT_EQ(std::set<int64_t>(ids.begin(), ids.begin() + 3),
            (std::set<int64_t>(c.ids.begin(), c.ids.end())));
  EXPECT_EQ(ids[3], -1);
  EXPECT_EQ(ids[4], -1);
  EXPECT_EQ(a.order().size(), 3u);
}

TEST(RetrieveAndAssemble, HitMissingFromStoreThrows) {
  std::mt19937 rng(47);
  Corpus c = make_corpus(rng, 50);
  VectorIndex index(kDim, Metric::kL2);
  index.add(c.vectors.data(), c.ids.data(), 50);
  auto store = make_store(30522, c.docs);
  PairAssembler a(bert_template(), options(64));
  SearchParams p;
  p.k = 5;
  std::vector<int64_t> ids(5);
  std::vector<float> scores(5);
  const Tokens q = {1, 2};
  const uint64_t gone = c.ids[17];
  store->remove(&gone, 1);
  // Searching with document 17's own vector: it is the first hit, and the store lacks it.
  const float* query = &c.vectors[17 * kDim];
  EXPECT_THROW(retrieve_and_assemble(index, *store, a, query, q.data(), q.size(), p, ids.data(), scores.data()),
               UnknownIdError);
  EXPECT_EQ(ids[0], int64_t(gone));
  // The assembler is free again afterwards.
  const uint64_t keep[3] = {c.ids[0], c.ids[1], c.ids[2]};
  EXPECT_NO_THROW(a.assemble_from_store(q.data(), q.size(), *store, keep, 3));
}

// ---------------------------------------------------------------------------------------------
// Pairs of different queries in one assembly

TEST(PairAssembler, MultiQueryRowsMatchReference) {
  std::mt19937 rng(48);
  // Short, empty and long queries: the long one is itself truncated under longest_first.
  std::vector<Tokens> queries = {{7, 8, 9}, {}, Tokens(90, 11), {42}};
  auto docs = random_docs(rng, 200, 150, 30000);
  std::vector<int64_t> qi(docs.size());
  for (auto& x : qi) x = int64_t(rng() % queries.size());
  std::vector<TokenView> qv = views(queries);
  for (Truncation tr : {Truncation::kLongestFirst, Truncation::kOnlySecond}) {
    for (const PairTemplate& t : {bert_template(), roberta_template()}) {
      for (auto [batch_tokens, rows] : {std::pair<size_t, size_t>{1000, 16}, {128, 256}, {100000, 7}}) {
        PairAssembler a(t, options(128, tr, batch_tokens, rows));
        a.assemble_multi(qv, qi.data(), views(docs));
        SCOPED_TRACE("batch_tokens " + std::to_string(batch_tokens) + " rows " + std::to_string(rows));
        check_assembly_multi(a, queries, qi, docs);
      }
    }
  }
}

TEST(PairAssembler, LeftSideRowsMatchReference) {
  // The side option and per-pair sides, every template, truncation rule, dtype and the narrow
  // (uint16) store path: each row holds the ends of its cut sequences, as the reference builds it.
  std::mt19937 rng(51);
  std::vector<Tokens> queries = {{7, 8, 9}, {}, Tokens(90, 11), {42}};
  for (auto& t : queries[2]) t = int32_t(rng() % 30000);
  auto docs = random_docs(rng, 200, 150, 30000);
  std::vector<int64_t> qi(docs.size());
  for (auto& x : qi) x = int64_t(rng() % queries.size());
  std::vector<uint8_t> mixed(docs.size());
  for (auto& e : mixed) e = uint8_t(rng() % 2);
  for (Truncation tr : {Truncation::kLongestFirst, Truncation::kOnlySecond}) {
    for (const PairTemplate& t : {bert_template(), roberta_template()}) {
      for (bool int32 : {false, true}) {
        SCOPED_TRACE(std::string("only_second ") + (tr == Truncation::kOnlySecond ? "1" : "0") + " int32 " +
                     (int32 ? "1" : "0"));
        AssemblerOptions o = options(128, tr, 1000, 16, int32);
        o.side = TruncationSide::kLeft;
        PairAssembler left(t, o);
        left.assemble_multi(views(queries), qi.data(), views(docs));
        check_assembly_multi(left, queries, qi, docs);
        PairAssembler per_pair(t, options(128, tr, 1000, 16, int32));
        per_pair.assemble_multi(views(queries), qi.data(), views(docs), mixed.data());
        check_assembly_multi(per_pair, queries, qi, docs, &mixed);
        // Per-pair sides override the option both ways.
        left.assemble_multi(views(queries), qi.data(), views(docs), mixed.data());
        check_assembly_multi(left, queries, qi, docs, &mixed);
      }
    }
  }
  std::map<uint64_t, Tokens> by_id;
  for (size_t i = 0; i < docs.size(); ++i) by_id[10 + i] = docs[i];
  auto store = make_store(30522, by_id);
  ASSERT_FALSE(store->wide());
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < docs.size(); ++i) ids.push_back(10 + i);
  AssemblerOptions o = options(128);
  o.side = TruncationSide::kLeft;
  PairAssembler a(bert_template(), o);
  a.assemble_from_store(queries[2].data(), queries[2].size(), *store, ids.data(), ids.size());
  check_assembly(a, queries[2], docs);
}

TEST(PairAssembler, MultiQueryWithOneQueryEqualsAssemble) {
  std::mt19937 rng(49);
  Tokens q = {5, 6, 7, 8, 9, 10};
  auto docs = random_docs(rng, 120, 80, 30000);
  for (bool int32 : {false, true}) {
    PairAssembler multi(bert_template(), options(64, Truncation::kLongestFirst, 512, 16, int32));
    PairAssembler single(bert_template(), options(64, Truncation::kLongestFirst, 512, 16, int32));
    std::vector<int64_t> zeros(docs.size(), 0);
    std::vector<Tokens> qs = {q};
    multi.assemble_multi(views(qs), zeros.data(), views(docs));
    single.assemble(q.data(), q.size(), views(docs));
    expect_same_assembly(multi, single);
  }
}

TEST(PairAssembler, MultiQueryPerQueryRowsEqualSingleAssembly) {
  // Each candidate's row equals its row in an assembly of its own query alone (up to padding).
  std::mt19937 rng(50);
  std::vector<Tokens> queries = {{1, 2}, {3, 4, 5, 6, 7, 8, 9, 10}, {}};
  auto docs = random_docs(rng, 60, 70, 1000);
  std::vector<int64_t> qi(docs.size());
  for (size_t i = 0; i < qi.size(); ++i) qi[i] = int64_t(i % queries.size());
  PairAssembler multi(roberta_template(), options(48, Truncation::kLongestFirst, 400, 8));
  multi.assemble_multi(views(queries), qi.data(), views(docs));
  auto unpadded = [](Row r) {
    size_t n = size_t(std::count(r.mask.begin(), r.mask.end(), 1));
    r.ids.resize(n);
    r.mask.resize(n);
    r.types.resize(n);
    return r;
  };
  for (size_t k = 0; k < queries.size(); ++k) {
    std::vector<Tokens> own;
    std::vector<size_t> cands;
    for (size_t i = 0; i < docs.size(); ++i)
      if (size_t(qi[i]) == k) {
        own.push_back(docs[i]);
        cands.push_back(i);
      }
    PairAssembler single(roberta_template(), options(48, Truncation::kLongestFirst, 400, 8));
    single.assemble(queries[k].data(), queries[k].size(), views(own));
    for (size_t j = 0; j < cands.size(); ++j) {
      EXPECT_EQ(unpadded(row_of_candidate(multi, cands[j])), unpadded(row_of_candidate(single, j)))
          << "query " << k << " candidate " << cands[j];
      EXPECT_EQ(multi.lengths()[cands[j]], single.lengths()[j]);
      EXPECT_EQ(multi.truncated()[cands[j]], single.truncated()[j]);
    }
  }
}

TEST(PairAssembler, MultiQueryReadsNarrowViews) {
  // Queries may be uint16 views (as DocStore hands out), like documents.
  std::vector<uint16_t> narrow = {300, 301, 302};
  TokenView nv;
  nv.u16 = narrow.data();
  nv.size = narrow.size();
  std::vector<Tokens> wide_q = {{300, 301, 302}};
  const std::vector<Tokens> docs = {{1, 2}, {3}};
  std::vector<int64_t> qi = {0, 0};
  PairAssembler a(bert_template(), options(64));
  a.assemble_multi({nv}, qi.data(), views(docs));
  check_assembly_multi(a, wide_q, qi, docs);
}

TEST(PairAssembler, MultiQueryIndexOutOfRangeThrows) {
  std::vector<Tokens> queries = {{1}, {2, 3}};
  const std::vector<Tokens> docs = {{4}, {5}, {6}};
  PairAssembler a(bert_template(), options(64));
  for (int64_t bad : {int64_t{2}, int64_t{-1}, int64_t{1} << 40}) {
    std::vector<int64_t> qi = {0, bad, 1};
    EXPECT_THROW(a.assemble_multi(views(queries), qi.data(), views(docs)), std::invalid_argument);
  }
  EXPECT_THROW(a.assemble_multi({}, std::vector<int64_t>{0}.data(), views({{1}})), std::invalid_argument);
  // Empty inputs are fine, and the assembler is free again after an error.
  a.assemble_multi({}, nullptr, {});
  EXPECT_TRUE(a.batches().empty());
  std::vector<int64_t> qi = {1, 0, 1};
  a.assemble_multi(views(queries), qi.data(), views(docs));
  check_assembly_multi(a, queries, qi, docs);
}

}  // namespace
}  // namespace tailrank
