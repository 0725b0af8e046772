// tailrank._core: the only module; each area binds itself in bind_<area>.cpp.
#include "bind_common.hpp"
#include "common.hpp"
#include "distance.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "tailrank native core (private; use the tailrank package)";
  py::module_ errors = py::module_::import("tailrank.errors");
  static py::handle corrupt = py::object(errors.attr("CorruptFileError")).release();
  static py::handle unknown = py::object(errors.attr("UnknownIdError")).release();
  static py::handle concurrent = py::object(errors.attr("ConcurrentUseError")).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const tailrank::CorruptFileError& e) {
      PyErr_SetString(corrupt.ptr(), e.what());
    } catch (const tailrank::UnknownIdError& e) {
      PyErr_SetString(unknown.ptr(), e.what());
    } catch (const tailrank::ConcurrentUseError& e) {
      PyErr_SetString(concurrent.ptr(), e.what());
    }
  });
  m.def("distance_isa", &tailrank::distance_isa, "The SIMD kernel the HNSW distances use on this CPU.");
  tailrank::bind::bind_index(m);
  tailrank::bind::bind_text(m);
}
