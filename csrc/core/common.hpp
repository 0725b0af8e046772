// Shared core pieces: domain errors, checksums, atomic file I/O, a small parallel-for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace tailrank {

/// A file that is truncated, bit-flipped, empty or not ours.
class CorruptFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An id that is not present (in a DocStore or index).
class UnknownIdError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An object meant for one thread at a time used from two at once.
class ConcurrentUseError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// CRC-32C (Castagnoli) of a byte range, continuing from `crc`.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

/// Writes `parts` (concatenated) to `path` atomically: temp file in the same directory,
/// fsync, rename over `path`, fsync of the directory.
void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts);

/// Reads a whole file; CorruptFileError if it cannot be read.
std::vector<char> read_file(const std::string& path);

/// Fixed header of every tailrank file: magic, format version, a kind-specific block, payload
/// size and payload checksum, and a checksum of the header itself.
struct FileHeader {
  char magic[8];          // "TAILRANK"
  uint32_t kind;          // what the file holds (FileKind)
  uint32_t version;       // format version of that kind
  uint64_t fields[6];     // kind-specific (dim, metric, count, ...)
  uint64_t payload_size;  // bytes after the header
  uint32_t payload_crc;   // crc32c of the payload
  uint32_t header_crc;    // crc32c of all bytes above
};
static_assert(sizeof(FileHeader) == 80, "FileHeader must stay 80 bytes");

enum FileKind : uint32_t { kIndexFile = 1, kDocStoreFile = 2 };

/// Builds a header for `payload` of the given kind and version.
FileHeader make_header(uint32_t kind, uint32_t version, const uint64_t fields[6], const void* payload,
                       size_t payload_size);
FileHeader make_header_crc(uint32_t kind, uint32_t version, const uint64_t fields[6], uint64_t payload_size,
                           uint32_t payload_crc);

/// Validates the header at the start of `bytes` (magic, kind, version, sizes, both checksums).
/// Throws CorruptFileError naming `path` and what is wrong.
const FileHeader& check_header(const std::vector<char>& bytes, uint32_t kind, uint32_t version,
                               const std::string& path);

/// Runs fn(i) for i in [0, n) on up to `threads` threads (0 = hardware). The first exception
/// thrown by any worker is rethrown on the caller after all workers stop.
template <class Fn>
void parallel_for(size_t n, size_t threads, Fn&& fn);

size_t default_threads();

/// Reader-writer lock that prefers writers: a waiting writer stops new readers, so a steady
/// stream of searches cannot starve an add (glibc's rwlock prefers readers).
class RwLock {
 public:
  void lock() {
    gate_.lock();
    rw_.lock();
    gate_.unlock();
  }
  void unlock() { rw_.unlock(); }
  void lock_shared() {
    std::lock_guard<std::mutex> g(gate_);
    rw_.lock_shared();
  }
  void unlock_shared() { rw_.unlock_shared(); }

 private:
  std::mutex gate_;
  std::shared_mutex rw_;
};

}  // namespace tailrank

#include "parallel.inl"
