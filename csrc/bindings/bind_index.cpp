// Bindings of VectorIndex and AllowList.
#include "bind_common.hpp"
#include "index.hpp"
#include "thread_pool.hpp"

namespace tailrank::bind {

void bind_index(py::module_& m) {
  py::class_<AllowList>(m, "AllowList", "An id allow-list applied inside the HNSW walk.")
      .def(py::init([](const CArray<uint64_t>& ids) {
             require_1d(ids, "allow");
             std::vector<uint64_t> v(ids.data(), ids.data() + ids.size());
             py::gil_scoped_release nogil;
             return new AllowList(std::move(v));
           }),
           py::arg("ids"))
      .def("__len__", [](const AllowList& a) { return a.ids().size(); })
      .def("__contains__", [](const AllowList& a, uint64_t id) { return a.contains(id); });

  py::class_<VectorIndex>(m, "VectorIndex")
      .def(py::init([](size_t dim, const std::string& metric, size_t M, size_t ef_construction, size_t capacity) {
             return new VectorIndex(dim, parse_metric(metric), M, ef_construction, capacity);
           }),
           py::arg("dim"), py::arg("metric"), py::arg("M"), py::arg("ef_construction"), py::arg("capacity"))
      .def(
          "add",
          [](VectorIndex& self, const CArray<float>& vectors, const CArray<uint64_t>& ids, size_t threads) {
            require_2d(vectors, self.dim(), "vectors", "pass a float32 array of one row per vector");
            require_1d(ids, "ids");
            if (size_t(ids.size()) != size_t(vectors.shape(0)))
              throw std::invalid_argument("got " + std::to_string(vectors.shape(0)) + " vectors but " +
                                          std::to_string(ids.size()) + " ids; pass one id per vector");
            py::gil_scoped_release nogil;
            self.add(vectors.data(), ids.data(), size_t(ids.size()), threads);
          },
          py::arg("vectors"), py::arg("ids"), py::arg("threads"))
      .def(
          "remove",
          [](VectorIndex& self, const CArray<uint64_t>& ids) {
            require_1d(ids, "ids");
            py::gil_scoped_release nogil;
            self.remove(ids.data(), size_t(ids.size()));
          },
          py::arg("ids"))
      .def(
          "search",
          [](const VectorIndex& self, const CArray<float>& queries, size_t k, size_t ef, const AllowList* allow,
             size_t threads) {
            require_2d(queries, self.dim(), "queries", "pass one float32 vector or a [n, dim] batch");
            size_t n = size_t(queries.shape(0));
            check_search_bounds(n, k, ef, threads);
            py::array_t<int64_t> ids({n, k});
            py::array_t<float> scores({n, k});
            SearchParams p{k, ef, allow, threads};
            int64_t* out_ids = ids.mutable_data();
            float* out_scores = scores.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.search(queries.data(), n, p, out_ids, out_scores);
            }
            return py::make_tuple(ids, scores);
          },
          py::arg("queries"), py::arg("k"), py::arg("ef"), py::arg("allow"), py::arg("threads"))
      .def(
          // The service hot path: one query, no filter, one thread, 1-D results.
          "search_one",
          [](const VectorIndex& self, const CArray<float>& query, size_t k, size_t ef) {
            if (query.ndim() != 1 || size_t(query.shape(0)) != self.dim())
              throw py::value_error("query must be one float32 vector of shape [" + std::to_string(self.dim()) + "]");
            check_search_bounds(1, k, ef, 1);
            py::array_t<int64_t> ids(static_cast<py::ssize_t>(k));
            py::array_t<float> scores(static_cast<py::ssize_t>(k));
            SearchParams p{k, ef, nullptr, 1};
            int64_t* out_ids = ids.mutable_data();
            float* out_scores = scores.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.search(query.data(), 1, p, out_ids, out_scores);
            }
            return py::make_tuple(ids, scores);
          },
          py::arg("query"), py::arg("k"), py::arg("ef"))
      // Accessors take the index's lock: never wait for a writer while holding the GIL.
      .def("__contains__", &VectorIndex::contains, py::arg("id"), py::call_guard<py::gil_scoped_release>())
      .def("__len__", &VectorIndex::size, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("capacity", py::cpp_function(&VectorIndex::capacity, py::call_guard<py::gil_scoped_release>()))
      .def_property_readonly("dim", &VectorIndex::dim)
      .def_property_readonly("metric", [](const VectorIndex& s) { return std::string(metric_name(s.metric())); })
      .def_property_readonly("M", &VectorIndex::M)
      .def_property_readonly("ef_construction", &VectorIndex::ef_construction)
      .def_property("default_ef", py::cpp_function(&VectorIndex::default_ef, py::call_guard<py::gil_scoped_release>()),
                    py::cpp_function(&VectorIndex::set_default_ef, py::call_guard<py::gil_scoped_release>()))
      .def("ids",
           [](const VectorIndex& self) {
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
          [](const VectorIndex& self, const std::string& path) {
            py::gil_scoped_release nogil;
            self.save(path);
          },
          py::arg("path"))
      .def(
          "_hold_write_lock",
          [](const VectorIndex& self, const py::function& fn) {
            std::unique_lock<RwLock> lk;
            {
              py::gil_scoped_release nogil;
              lk = self.write_lock();
            }
            fn();
          },
          py::arg("fn"), "Calls fn() while holding the index as a writer does (for tests).")
      .def_static(
          "load",
          [](const std::string& path) {
            py::gil_scoped_release nogil;
            return VectorIndex::load(path);
          },
          py::arg("path"));
  m.def("_pool_workers", &pool_workers, "Worker threads of the core's pool (for tests).");
}

}  // namespace tailrank::bind
