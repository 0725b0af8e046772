// Bindings of DocStore, PairAssembler and the fused retrieve_and_assemble call.
#include "bind_common.hpp"
#include "cuda_host.hpp"
#include "doc_store.hpp"
#include "fused.hpp"
#include "pairs.hpp"

#include <optional>

namespace tailrank::bind {

namespace {

Truncation parse_truncation(const std::string& s) {
  if (s == "longest_first") return Truncation::kLongestFirst;
  if (s == "only_second") return Truncation::kOnlySecond;
  throw std::invalid_argument("truncation must be \"longest_first\" or \"only_second\", got \"" + s + "\"");
}

TruncationSide parse_side(const std::string& s) {
  if (s == "right") return TruncationSide::kRight;
  if (s == "left") return TruncationSide::kLeft;
  throw std::invalid_argument("truncation_side must be \"right\" (keep the starts) or \"left\" (keep the ends), got \"" +
                              s + "\"");
}

/// Documents copied out of Python objects before the GIL is released.
struct OwnedDocs {
  std::vector<int32_t> flat;
  std::vector<TokenView> views;
};

OwnedDocs own_docs(const py::sequence& docs, const char* what = "document") {
  OwnedDocs out;
  std::vector<size_t> offsets{0};
  std::vector<CArray<int32_t>> arrays;
  arrays.reserve(docs.size());
  for (size_t i = 0; i < docs.size(); ++i) {
    auto a = CArray<int32_t>::ensure(docs[i]);
    if (!a || a.ndim() != 1)
      throw std::invalid_argument(std::string(what) + " " + std::to_string(i) + " must be a 1-D sequence of token ids");
    offsets.push_back(offsets.back() + size_t(a.size()));
    arrays.push_back(std::move(a));
  }
  out.flat.resize(offsets.back());
  for (size_t i = 0; i < arrays.size(); ++i)
    std::copy(arrays[i].data(), arrays[i].data() + arrays[i].size(), out.flat.begin() + offsets[i]);
  out.views.resize(arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    out.views[i].i32 = out.flat.data() + offsets[i];
    out.views[i].size = offsets[i + 1] - offsets[i];
  }
  return out;
}

/// A 1-D numpy array over one of the assembler's buffers. Its base is a capsule holding a
/// reference to the buffer, so the array stays valid and unchanged while Python holds it; the
/// assembler takes a fresh buffer for its next call while any such array is alive.
py::array buffer_view(const PairAssembler& a, const std::shared_ptr<Buffer>& buf) {
  if (a.busy()) throw ConcurrentUseError("this PairAssembler is assembling on another thread; use one per thread");
  size_t n = buf ? a.total_elements() : 0;
  if (n == 0) return a.options().int32 ? py::array(py::array_t<int32_t>(0)) : py::array(py::array_t<int64_t>(0));
  auto* owner = new std::shared_ptr<Buffer>(buf);
  py::capsule base(owner, [](void* p) { delete static_cast<std::shared_ptr<Buffer>*>(p); });
  if (a.options().int32) return py::array_t<int32_t>({n}, {sizeof(int32_t)}, static_cast<int32_t*>(buf->data()), base);
  return py::array_t<int64_t>({n}, {sizeof(int64_t)}, static_cast<int64_t*>(buf->data()), base);
}

py::tuple assembly_result(const PairAssembler& a) {
  py::list batches;
  for (const BatchSpec& b : a.batches()) batches.append(py::make_tuple(b.row_start, b.rows, b.seq_len, b.offset));
  py::array_t<int64_t> order(a.order().size());
  std::copy(a.order().begin(), a.order().end(), order.mutable_data());
  py::array_t<int64_t> lengths(a.lengths().size());
  std::copy(a.lengths().begin(), a.lengths().end(), lengths.mutable_data());
  py::array_t<bool> truncated(a.truncated().size());
  std::copy(a.truncated().begin(), a.truncated().end(), truncated.mutable_data());
  return py::make_tuple(batches, order, lengths, truncated);
}

}  // namespace

void bind_text(py::module_& m) {
  py::class_<DocStore>(m, "DocStore")
      .def(py::init<size_t>(), py::arg("vocab_size"))
      .def(
          "add",
          [](DocStore& self, const CArray<uint64_t>& ids, const CArray<int64_t>& flat, const CArray<int64_t>& offsets) {
            require_1d(ids, "ids");
            require_1d(flat, "flat");
            require_1d(offsets, "offsets");
            if (size_t(offsets.size()) != size_t(ids.size()) + 1)
              throw std::invalid_argument("offsets must have len(ids) + 1 entries, got " +
                                          std::to_string(offsets.size()) + " for " + std::to_string(ids.size()) +
                                          " ids");
            py::gil_scoped_release nogil;
            self.add(ids.data(), size_t(ids.size()), flat.data(), size_t(flat.size()), offsets.data());
          },
          py::arg("ids"), py::arg("flat"), py::arg("offsets"))
      .def(
          "get",
          [](const DocStore& self, uint64_t id) {
            std::vector<int32_t> v;
            {
              py::gil_scoped_release nogil;
              v = self.get(id);
            }
            py::array_t<int32_t> out(v.size());
            std::copy(v.begin(), v.end(), out.mutable_data());
            return out;
          },
          py::arg("id"))
      .def(
          "remove",
          [](DocStore& self, const CArray<uint64_t>& ids) {
            require_1d(ids, "ids");
            py::gil_scoped_release nogil;
            self.remove(ids.data(), size_t(ids.size()));
          },
          py::arg("ids"))
      // Accessors take the store's lock: never wait for a writer while holding the GIL.
      .def("__contains__", &DocStore::contains, py::arg("id"), py::call_guard<py::gil_scoped_release>())
      .def("__len__", &DocStore::size, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("vocab_size", &DocStore::vocab_size)
      .def_property_readonly("wide", &DocStore::wide)
      .def_property_readonly("arena_tokens", py::cpp_function(&DocStore::arena_tokens, py::call_guard<py::gil_scoped_release>()))
      .def("ids",
           [](const DocStore& self) {
             std::vector<uint64_t> v;
             {
               py::gil_scoped_release nogil;
               v = self.ids();
             }
             py::array_t<int64_t> out(v.size());
             std::copy(v.begin(), v.end(), out.mutable_data());
             return out;
           })
      .def(
          "save",
          [](const DocStore& self, const std::string& path) {
            py::gil_scoped_release nogil;
            self.save(path);
          },
          py::arg("path"))
      .def_static(
          "load",
          [](const std::string& path) {
            py::gil_scoped_release nogil;
            return DocStore::load(path);
          },
          py::arg("path"));

  py::class_<PairAssembler>(m, "PairAssembler")
      .def(py::init([](const std::vector<std::tuple<int, int64_t, int>>& pieces, int64_t pad_id, size_t max_length,
                       const std::string& truncation, size_t batch_tokens, size_t max_batch_size, bool int32,
                       const std::string& truncation_side) {
             PairTemplate t;
             for (const auto& [kind, token, type] : pieces) {
               if (kind < 0 || kind > 2) throw std::invalid_argument("template piece kind must be 0, 1 or 2");
               t.pieces.push_back(TemplatePiece{TemplatePiece::Kind(kind), token, type});
             }
             t.pad_id = pad_id;
             AssemblerOptions o{max_length, parse_truncation(truncation), batch_tokens, max_batch_size, int32,
                                parse_side(truncation_side)};
             return new PairAssembler(std::move(t), o);
           }),
           py::arg("pieces"), py::arg("pad_id"), py::arg("max_length"), py::arg("truncation"), py::arg("batch_tokens"),
           py::arg("max_batch_size"), py::arg("int32"), py::arg("truncation_side") = "right")
      .def(
          "assemble",
          [](PairAssembler& self, const CArray<int32_t>& query, const py::sequence& docs) {
            require_1d(query, "query_ids");
            std::vector<int32_t> q(query.data(), query.data() + query.size());
            OwnedDocs owned = own_docs(docs);
            {
              py::gil_scoped_release nogil;
              self.assemble(q.data(), q.size(), owned.views);
            }
            return assembly_result(self);
          },
          py::arg("query_ids"), py::arg("docs"))
      .def(
          "assemble_multi",
          [](PairAssembler& self, const py::sequence& queries, const CArray<int64_t>& query_index,
             const py::sequence& docs, const std::optional<CArray<uint8_t>>& keep_ends) {
            require_1d(query_index, "query_index");
            if (size_t(query_index.size()) != docs.size())
              throw std::invalid_argument("query_index must have one entry per document: got " +
                                          std::to_string(query_index.size()) + " for " + std::to_string(docs.size()) +
                                          " documents");
            std::vector<uint8_t> ends;
            if (keep_ends) {
              require_1d(*keep_ends, "keep_ends");
              if (size_t(keep_ends->size()) != docs.size())
                throw std::invalid_argument("keep_ends must have one entry per document: got " +
                                            std::to_string(keep_ends->size()) + " for " +
                                            std::to_string(docs.size()) + " documents");
              ends.assign(keep_ends->data(), keep_ends->data() + keep_ends->size());
            }
            OwnedDocs owned_q = own_docs(queries, "query");
            OwnedDocs owned_d = own_docs(docs);
            std::vector<int64_t> qi(query_index.data(), query_index.data() + query_index.size());
            {
              py::gil_scoped_release nogil;
              self.assemble_multi(owned_q.views, qi.data(), owned_d.views, keep_ends ? ends.data() : nullptr);
            }
            return assembly_result(self);
          },
          py::arg("queries"), py::arg("query_index"), py::arg("docs"), py::arg("keep_ends") = py::none())
      .def(
          "assemble_from_store",
          [](PairAssembler& self, const CArray<int32_t>& query, const DocStore& store, const CArray<uint64_t>& ids) {
            require_1d(query, "query_ids");
            require_1d(ids, "ids");
            std::vector<int32_t> q(query.data(), query.data() + query.size());
            std::vector<uint64_t> idv(ids.data(), ids.data() + ids.size());
            {
              py::gil_scoped_release nogil;
              self.assemble_from_store(q.data(), q.size(), store, idv.data(), idv.size());
            }
            return assembly_result(self);
          },
          py::arg("query_ids"), py::arg("store"), py::arg("ids"))
      .def("input_ids", [](const PairAssembler& a) { return buffer_view(a, a.input_ids()); })
      .def("attention_mask", [](const PairAssembler& a) { return buffer_view(a, a.attention_mask()); })
      .def("token_type_ids", [](const PairAssembler& a) { return buffer_view(a, a.token_type_ids()); })
      .def(
          "use_pinned_memory",
          [](PairAssembler& self, const std::string& library) { self.set_allocator(pinned_allocator(library)); },
          py::arg("library") = "")
      .def("truncate_lengths", &PairAssembler::truncate_lengths, py::arg("query_len"), py::arg("doc_len"))
      .def_property_readonly("buffer_bytes", &PairAssembler::buffer_bytes)
      .def_property_readonly("max_length", [](const PairAssembler& a) { return a.options().max_length; })
      .def_property_readonly("truncation_side", [](const PairAssembler& a) {
        return std::string(a.options().side == TruncationSide::kLeft ? "left" : "right");
      })
      .def_property_readonly("batch_tokens", [](const PairAssembler& a) { return a.options().batch_tokens; })
      .def_property_readonly("max_batch_size", [](const PairAssembler& a) { return a.options().max_batch_rows; })
      .def_property_readonly("n_special", [](const PairAssembler& a) { return a.pair_template().n_special(); });

  m.def(
      "retrieve_and_assemble",
      [](const VectorIndex& index, const DocStore& store, PairAssembler& assembler, const CArray<float>& query_vec,
         const CArray<int32_t>& query_ids, size_t k, size_t ef, const AllowList* allow) {
        require_1d(query_vec, "query_vector");
        require_1d(query_ids, "query_ids");
        if (size_t(query_vec.size()) != index.dim())
          throw std::invalid_argument("query_vector has " + std::to_string(query_vec.size()) +
                                      " values; the index has dim " + std::to_string(index.dim()));
        std::vector<float> qv(query_vec.data(), query_vec.data() + query_vec.size());
        std::vector<int32_t> q(query_ids.data(), query_ids.data() + query_ids.size());
        check_search_bounds(1, k, ef, 1);
        py::array_t<int64_t> ids(k);
        py::array_t<float> scores(k);
        int64_t* out_ids = ids.mutable_data();
        float* out_scores = scores.mutable_data();
        size_t hits;
        {
          py::gil_scoped_release nogil;
          hits = retrieve_and_assemble(index, store, assembler, qv.data(), q.data(), q.size(),
                                       SearchParams{k, ef, allow, 1}, out_ids, out_scores);
        }
        return py::make_tuple(ids, scores, hits, assembly_result(assembler));
      },
      py::arg("index"), py::arg("store"), py::arg("assembler"), py::arg("query_vector"), py::arg("query_ids"),
      py::arg("k"), py::arg("ef"), py::arg("allow"));
}

}  // namespace tailrank::bind
