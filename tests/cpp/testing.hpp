// Helpers shared by the C++ unit tests: a self-removing temp directory and file tampering.
#pragma once

#include <stdlib.h>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.hpp"

namespace tailrank::testing {

/// A fresh directory under the system temp directory, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "tailrank-test-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// Overwrites `path` with `bytes` (plainly, not atomically: tests use it to plant damaged files).
inline void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

/// The ways a saved file gets damaged; every one must make load() throw CorruptFileError.
inline std::vector<std::pair<std::string, std::vector<char>>> damaged_copies(const std::vector<char>& good) {
  std::vector<std::pair<std::string, std::vector<char>>> out;
  out.emplace_back("empty", std::vector<char>{});
  out.emplace_back("header only, cut short", std::vector<char>(good.begin(), good.begin() + 40));
  out.emplace_back("header without payload", std::vector<char>(good.begin(), good.begin() + sizeof(FileHeader)));
  out.emplace_back("last byte missing", std::vector<char>(good.begin(), good.end() - 1));
  out.emplace_back("half missing", std::vector<char>(good.begin(), good.begin() + good.size() / 2));
  std::vector<char> longer = good;
  longer.push_back('\0');
  out.emplace_back("trailing byte", longer);
  const size_t flips[] = {0, 9, 20, 72, 79, sizeof(FileHeader), sizeof(FileHeader) + (good.size() - sizeof(FileHeader)) / 2,
                          good.size() - 1};
  for (size_t at : flips) {
    std::vector<char> bad = good;
    bad[at] = static_cast<char>(bad[at] ^ 0x10);
    out.emplace_back("bit flipped at byte " + std::to_string(at), bad);
  }
  return out;
}

/// Row-major [n, dim] vectors drawn around `clusters` Gaussian centres (a mixture of Gaussians).
inline std::vector<float> clustered_vectors(size_t n, size_t dim, size_t clusters, std::mt19937& rng,
                                            float spread = 0.35f) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> centres(clusters * dim);
  for (float& c : centres) c = normal(rng);
  std::uniform_int_distribution<size_t> pick(0, clusters - 1);
  std::vector<float> out(n * dim);
  for (size_t i = 0; i < n; ++i) {
    size_t c = pick(rng);
    for (size_t j = 0; j < dim; ++j) out[i * dim + j] = centres[c * dim + j] + spread * normal(rng);
  }
  return out;
}

}  // namespace tailrank::testing
