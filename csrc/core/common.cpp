#include "common.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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
  ::close(fd);
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

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
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

const FileHeader& check_header(const std::vector<char>& bytes, uint32_t kind, uint32_t version,
                               const std::string& path) {
  if (bytes.empty()) throw CorruptFileError(path + " is empty: not a tailrank file");
  if (bytes.size() < sizeof(FileHeader))
    throw CorruptFileError(path + " is truncated (" + std::to_string(bytes.size()) +
                           " bytes, shorter than the header)");
  const auto& h = *reinterpret_cast<const FileHeader*>(bytes.data());
  if (std::memcmp(h.magic, "TAILRANK", 8) != 0) throw CorruptFileError(path + " is not a tailrank file (bad magic)");
  if (crc32c(&h, offsetof(FileHeader, header_crc)) != h.header_crc)
    throw CorruptFileError(path + ": header checksum mismatch (file corrupted)");
  if (h.kind != kind)
    throw CorruptFileError(path + " holds another kind of tailrank data (kind " + std::to_string(h.kind) +
                           ", expected " + std::to_string(kind) + ")");
  if (h.version != version)
    throw CorruptFileError(path + " has format version " + std::to_string(h.version) + "; this build reads version " +
                           std::to_string(version));
  if (bytes.size() - sizeof(FileHeader) != h.payload_size)
    throw CorruptFileError(path + " is truncated or has trailing bytes (payload " +
                           std::to_string(bytes.size() - sizeof(FileHeader)) + " bytes, header says " +
                           std::to_string(h.payload_size) + ")");
  if (crc32c(bytes.data() + sizeof(FileHeader), h.payload_size) != h.payload_crc)
    throw CorruptFileError(path + ": payload checksum mismatch (file corrupted)");
  return h;
}

}  // namespace tailrank
