// libFuzzer target over the core's file loaders. The input is a whole file; its checksums are
// recomputed before loading (as anyone editing a file can), so the fuzzer explores the loaders'
// structural validation rather than the CRC check. A file that loads is then used: searched,
// listed, and read back.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.hpp"
#include "doc_store.hpp"
#include "index.hpp"

using namespace tailrank;

namespace {
std::vector<char> resealed(const uint8_t* data, size_t size) {
  std::vector<char> b(data, data + size);
  if (b.size() >= sizeof(FileHeader)) {
    FileHeader h;
    std::memcpy(&h, b.data(), sizeof h);
    h.payload_size = b.size() - sizeof h;
    h.payload_crc = crc32c(b.data() + sizeof h, h.payload_size);
    h.header_crc = crc32c(&h, offsetof(FileHeader, header_crc));
    std::memcpy(b.data(), &h, sizeof h);
  }
  return b;
}

void use_index(const VectorIndex& index) {
  std::vector<float> q(index.dim(), 0.5f);
  std::vector<int64_t> ids(10);
  std::vector<float> scores(10);
  SearchParams p;
  p.k = 10;
  p.threads = 1;
  index.search(q.data(), 1, p, ids.data(), scores.data());
  for (uint64_t id : index.ids()) (void)index.contains(id);
}

void use_store(const DocStore& store) {
  for (uint64_t id : store.ids()) (void)store.get(id);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<char> b = resealed(data, size);
  uint32_t kind = 0;
  if (b.size() >= 12) std::memcpy(&kind, b.data() + 8, 4);
  try {
    if (kind == kDocStoreFile)
      use_store(*DocStore::load_bytes(b.data(), b.size(), "fuzz"));
    else
      use_index(*VectorIndex::load_bytes(b.data(), b.size(), "fuzz"));
  } catch (const CorruptFileError&) {
  } catch (const std::invalid_argument&) {  // a loaded index whose dim the query does not fit
  }
  return 0;
}
