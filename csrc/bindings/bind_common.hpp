// Shared helpers of the binding files: array checks with actionable messages.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;

namespace tailrank::bind {

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

/// Checks a 2-D [n, cols] array (cols == 0: any).
template <class T>
void require_2d(const CArray<T>& a, size_t cols, const char* what, const char* hint) {
  if (a.ndim() != 2 || (cols && size_t(a.shape(1)) != cols))
    throw std::invalid_argument(std::string(what) + " must have shape [n, " + std::to_string(cols) + "], got " +
                                std::to_string(a.ndim()) + "-D array" +
                                (a.ndim() == 2 ? " of shape [" + std::to_string(a.shape(0)) + ", " +
                                                     std::to_string(a.shape(1)) + "]"
                                               : std::string()) +
                                "; " + hint);
}

template <class T>
void require_1d(const CArray<T>& a, const char* what) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(what) + " must be a 1-D array, got " + std::to_string(a.ndim()) + "-D");
}

void bind_index(py::module_& m);
void bind_text(py::module_& m);

}  // namespace tailrank::bind
