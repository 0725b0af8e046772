#include "common.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

namespace tailrank {
namespace {

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (0x82F63B78u ^ (c >> 1)) : (c >> 1);
    t[i] = c;
  }
  return t;
}

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("cannot write " + path + ": " + errno_text());
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

std::string dir_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

/// Opens a unique temp file beside `path`; returns fd and sets tmp.
int open_temp(const std::string& path, std::string& tmp) {
  std::random_device rd;
  for (int attempt = 0; attempt < 16; ++attempt) {
    tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(rd());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) return fd;
    if (errno != EEXIST) throw std::runtime_error("cannot create " + tmp + ": " + errno_text());
  }
  throw std::runtime_error("cannot create a temp file beside " + path);
}

void finish_atomic(int fd, const std::string& tmp, const std::string& path) {
  if (::fsync(fd) != 0) {
    std::string e = errno_text();
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot fsync " + tmp + ": " + e);
  }
  if (::close(fd) != 0) {
    std::string e = errno_text();
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot close " + tmp + ": " + e);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string e = errno_text();
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot rename " + tmp + " to " + path + ": " + e);
  }
  int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

namespace {
uint32_t crc32c_table(const unsigned char* p, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return crc;
}

// SSE4.2's crc32 instruction computes CRC-32C; chosen at run time (no -msse4.2 in the build).
__attribute__((target("sse4.2"))) uint32_t crc32c_hw(const unsigned char* p, size_t n, uint32_t crc) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
  }
  uint32_t c32 = uint32_t(c);
  for (; n > 0; --n, ++p) c32 = __builtin_ia32_crc32qi(c32, *p);
  return c32;
}

bool have_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  crc = have_sse42() ? crc32c_hw(p, n, crc) : crc32c_table(p, n, crc);
  return ~crc;
}

size_t default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : hw;
}

void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& parts) {
  std::string tmp;
  int fd = open_temp(path, tmp);
  try {
    for (const auto& part : parts) write_all(fd, part.first, part.second, tmp);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  finish_atomic(fd, tmp, path);
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw CorruptFileError("cannot open " + path + " for reading");
  std::streamoff size = in.tellg();
  if (size < 0) throw CorruptFileError("cannot read " + path);
  std::vector<char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(bytes.data(), size)) throw CorruptFileError("cannot read " + path);
  return bytes;
}

FileHeader make_header_crc(uint32_t kind, uint32_t version, const uint64_t fields[6], uint64_t payload_size,
                           uint32_t payload_crc) {
  FileHeader h{};
  std::memcpy(h.magic, "TAILRANK", 8);
  h.kind = kind;
  h.version = version;
  for (int i = 0; i < 6; ++i) h.fields[i] = fields[i];
  h.payload_size = payload_size;
  h.payload_crc = payload_crc;
  h.header_crc = crc32c(&h, offsetof(FileHeader, header_crc));
  return h;
}

FileHeader make_header(uint32_t kind, uint32_t version, const uint64_t fields[6], const void* payload,
                       size_t payload_size) {
  return make_header_crc(kind, version, fields, payload_size, crc32c(payload, payload_size));
}

namespace {
void validate_header(const FileHeader& h, uint64_t after_header, uint32_t kind, const std::vector<uint32_t>& versions,
                     const std::string& path) {
  if (std::memcmp(h.magic, "TAILRANK", 8) != 0) throw CorruptFileError(path + " is not a tailrank file (bad magic)");
  if (crc32c(&h, offsetof(FileHeader, header_crc)) != h.header_crc)
    throw CorruptFileError(path + ": header checksum mismatch (file corrupted)");
  if (h.kind != kind)
    throw CorruptFileError(path + " holds another kind of tailrank data (kind " + std::to_string(h.kind) +
                           ", expected " + std::to_string(kind) + ")");
  if (std::find(versions.begin(), versions.end(), h.version) == versions.end()) {
    std::string known;
    for (uint32_t v : versions) known += (known.empty() ? "" : ", ") + std::to_string(v);
    throw CorruptFileError(path + " has format version " + std::to_string(h.version) + "; this build reads version " +
                           known + " (rebuild the file from its source data with this version)");
  }
  if (after_header != h.payload_size)
    throw CorruptFileError(path + " is truncated or has trailing bytes (payload " + std::to_string(after_header) +
                           " bytes, header says " + std::to_string(h.payload_size) + ")");
}
}  // namespace

const FileHeader& check_header(const std::vector<char>& bytes, uint32_t kind, uint32_t version,
                               const std::string& path) {
  if (bytes.empty()) throw CorruptFileError(path + " is empty: not a tailrank file");
  if (bytes.size() < sizeof(FileHeader))
    throw CorruptFileError(path + " is truncated (" + std::to_string(bytes.size()) +
                           " bytes, shorter than the header)");
  const auto& h = *reinterpret_cast<const FileHeader*>(bytes.data());
  validate_header(h, bytes.size() - sizeof(FileHeader), kind, {version}, path);
  if (crc32c(bytes.data() + sizeof(FileHeader), h.payload_size) != h.payload_crc)
    throw CorruptFileError(path + ": payload checksum mismatch (file corrupted)");
  return h;
}

// ---- streaming writer -------------------------------------------------------------------------

namespace {
constexpr size_t kWriteBuffer = size_t(1) << 20;
}

FileWriter::FileWriter(std::string path, uint32_t kind, uint32_t version, const uint64_t fields[6])
    : path_(std::move(path)), kind_(kind), version_(version) {
  std::copy(fields, fields + 6, fields_);
  fd_ = open_temp(path_, tmp_);
  buf_.reserve(kWriteBuffer);
  FileHeader placeholder{};  // sealed by commit()
  try {
    write_all(fd_, &placeholder, sizeof placeholder, tmp_);
  } catch (...) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
    throw;
  }
}

FileWriter::~FileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void FileWriter::flush() {
  if (!buf_.empty()) write_all(fd_, buf_.data(), buf_.size(), tmp_);
  buf_.clear();
}

void FileWriter::write(const void* data, size_t n) {
  if (n == 0) return;
  crc_ = crc32c(data, n, crc_);
  size_ += n;
  if (n >= kWriteBuffer) {
    flush();
    write_all(fd_, data, n, tmp_);
    return;
  }
  if (buf_.size() + n > kWriteBuffer) flush();
  const char* p = static_cast<const char*>(data);
  buf_.insert(buf_.end(), p, p + n);
}

void FileWriter::commit() {
  flush();
  FileHeader h = make_header_crc(kind_, version_, fields_, size_, crc_);
  const char* p = reinterpret_cast<const char*>(&h);
  size_t left = sizeof h;
  off_t at = 0;
  while (left > 0) {
    ssize_t w = ::pwrite(fd_, p, left, at);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("cannot write " + tmp_ + ": " + errno_text());
    }
    p += w;
    at += w;
    left -= size_t(w);
  }
  int fd = fd_;
  fd_ = -1;  // finish_atomic closes or removes it from here on
  finish_atomic(fd, tmp_, path_);
}

// ---- sources and the payload reader -----------------------------------------------------------

FileSource::FileSource(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw CorruptFileError("cannot open " + path + " for reading: " + errno_text());
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    throw CorruptFileError(path + " is not a regular file");
  }
  size_ = uint64_t(st.st_size);
}

FileSource::~FileSource() {
  if (fd_ >= 0) ::close(fd_);
}

void FileSource::read(void* dst, size_t n) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::read(fd_, p, std::min<size_t>(n, size_t(1) << 30));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw CorruptFileError("cannot read " + path_ + ": " + errno_text());
    }
    if (r == 0) throw CorruptFileError(path_ + " ended early (changed while being read?)");
    p += r;
    n -= size_t(r);
  }
}

void MemorySource::read(void* dst, size_t n) {
  if (n > n_ - pos_) throw CorruptFileError(name_ + " ended early");
  if (n) std::memcpy(dst, p_ + pos_, n);
  pos_ += n;
}

PayloadReader::PayloadReader(ByteSource& src, uint32_t kind, std::vector<uint32_t> versions) : src_(src) {
  uint64_t size = src.size();
  if (size == 0) throw CorruptFileError(src.name() + " is empty: not a tailrank file");
  if (size < sizeof(FileHeader))
    throw CorruptFileError(src.name() + " is truncated (" + std::to_string(size) + " bytes, shorter than the header)");
  src.read(&h_, sizeof h_);
  validate_header(h_, size - sizeof(FileHeader), kind, versions, src.name());
}

void PayloadReader::read(void* dst, size_t n, const char* what) {
  if (n > remaining())
    fail(std::string("truncated: ") + what + " needs " + std::to_string(n) + " bytes, " +
         std::to_string(remaining()) + " remain");
  src_.read(dst, n);
  crc_ = crc32c(dst, n, crc_);
  read_ += n;
}

void PayloadReader::finish() {
  if (remaining() != 0) fail(std::to_string(remaining()) + " payload bytes left after the last record");
  if (crc_ != h_.payload_crc) fail("payload checksum mismatch (file corrupted)");
}

void PayloadReader::fail(const std::string& what) const { throw CorruptFileError(src_.name() + ": " + what); }

}  // namespace tailrank
