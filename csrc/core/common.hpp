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

/// Builds a header for a payload of the given kind, version, size and checksum.
FileHeader make_header_crc(uint32_t kind, uint32_t version, const uint64_t fields[6], uint64_t payload_size,
                           uint32_t payload_crc);
FileHeader make_header(uint32_t kind, uint32_t version, const uint64_t fields[6], const void* payload,
                       size_t payload_size);

/// Validates a whole file held in memory (header and payload checksum); see PayloadReader.
const FileHeader& check_header(const std::vector<char>& bytes, uint32_t kind, uint32_t version,
                               const std::string& path);

/// Writes `parts` (concatenated) to `path` atomically: temp file in the same directory,
/// fsync, rename over `path`, fsync of the directory. Every write is checked.
void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts);

/// Reads a whole file; CorruptFileError if it cannot be read.
std::vector<char> read_file(const std::string& path);

/// Streams one tailrank file into a temp file beside `path`; commit() seals it (header with the
/// payload checksum, fsync, rename over `path`, fsync of the directory). Every write is checked:
/// a failure (disk full, quota) throws, and a writer destroyed before commit() removes its temp
/// file, so a failed save never leaves a sealed file behind.
class FileWriter {
 public:
  FileWriter(std::string path, uint32_t kind, uint32_t version, const uint64_t fields[6]);
  ~FileWriter();
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;
  void write(const void* data, size_t n);
  template <class T>
  void put(const T& v) {
    write(&v, sizeof v);
  }
  void commit();

 private:
  void flush();
  std::string path_, tmp_;
  int fd_ = -1;
  uint32_t kind_, version_;
  uint64_t fields_[6];
  uint64_t size_ = 0;
  uint32_t crc_ = 0;
  std::vector<char> buf_;
};

/// Bytes read front to back, from a file or from memory (fuzzing, tests).
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual uint64_t size() const = 0;
  /// Reads exactly n bytes; CorruptFileError if the source ends first.
  virtual void read(void* dst, size_t n) = 0;
  virtual const std::string& name() const = 0;
};

class FileSource : public ByteSource {
 public:
  explicit FileSource(const std::string& path);
  ~FileSource() override;
  uint64_t size() const override { return size_; }
  void read(void* dst, size_t n) override;
  const std::string& name() const override { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

class MemorySource : public ByteSource {
 public:
  MemorySource(const void* data, size_t n, std::string name) : p_(static_cast<const char*>(data)), n_(n), name_(std::move(name)) {}
  uint64_t size() const override { return n_; }
  void read(void* dst, size_t n) override;
  const std::string& name() const override { return name_; }

 private:
  const char* p_;
  size_t n_, pos_ = 0;
  std::string name_;
};

/// The payload of one tailrank file. The constructor validates the header (magic, header
/// checksum, kind, a version in `versions`, payload size == bytes after the header); read()
/// never reads past the payload; finish() checks that all of it was read and its checksum.
class PayloadReader {
 public:
  PayloadReader(ByteSource& src, uint32_t kind, std::vector<uint32_t> versions);
  const FileHeader& header() const { return h_; }
  uint64_t remaining() const { return h_.payload_size - read_; }
  /// Reads n payload bytes for `what`; CorruptFileError naming it if fewer remain.
  void read(void* dst, size_t n, const char* what);
  template <class T>
  T get(const char* what) {
    T v;
    read(&v, sizeof v, what);
    return v;
  }
  void finish();
  /// Throws CorruptFileError("<file>: <what>").
  [[noreturn]] void fail(const std::string& what) const;

 private:
  ByteSource& src_;
  FileHeader h_{};
  uint64_t read_ = 0;
  uint32_t crc_ = 0;
};

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
