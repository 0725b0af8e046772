#include "cuda_host.hpp"

#include <dlfcn.h>

#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

namespace tailrank {

namespace {
using HostAlloc = int (*)(void**, size_t, unsigned int);
using FreeHost = int (*)(void*);
constexpr unsigned kCudaHostAllocPortable = 1;

struct CudaRuntime {
  HostAlloc host_alloc = nullptr;
  FreeHost free_host = nullptr;
};

void* pinned_alloc(size_t bytes, void* ctx) {
  auto* rt = static_cast<CudaRuntime*>(ctx);
  void* p = nullptr;
  int err = rt->host_alloc(&p, bytes == 0 ? 64 : bytes, kCudaHostAllocPortable);
  if (err != 0 || p == nullptr)
    throw std::runtime_error("cudaHostAlloc of " + std::to_string(bytes) + " bytes failed (CUDA error " +
                             std::to_string(err) + ")");
  return p;
}

void pinned_free(void* p, void* ctx) { static_cast<CudaRuntime*>(ctx)->free_host(p); }

void* open_runtime(const std::string& library, std::string& tried) {
  std::vector<std::string> names;
  if (!library.empty()) names.push_back(library);
  for (const char* n : {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) names.emplace_back(n);
  // Prefer a runtime already in the process (e.g. loaded by ONNX Runtime's CUDA provider).
  for (const auto& n : names)
    if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) return h;
  for (const auto& n : names) {
    if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    tried += (tried.empty() ? "" : ", ") + n;
  }
  return nullptr;
}
}  // namespace

Allocator pinned_allocator(const std::string& library) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<CudaRuntime>> runtimes;  // live as long as the process
  std::lock_guard<std::mutex> g(mu);
  std::string tried;
  void* handle = open_runtime(library, tried);
  if (!handle) throw std::runtime_error("no CUDA runtime could be loaded (tried " + tried + ")");
  auto rt = std::make_unique<CudaRuntime>();
  rt->host_alloc = reinterpret_cast<HostAlloc>(dlsym(handle, "cudaHostAlloc"));
  rt->free_host = reinterpret_cast<FreeHost>(dlsym(handle, "cudaFreeHost"));
  if (!rt->host_alloc || !rt->free_host)
    throw std::runtime_error("the loaded CUDA runtime lacks cudaHostAlloc/cudaFreeHost");
  // Probe once, so a runtime without a usable driver or device is refused here, not at the
  // first assembly.
  void* probe = nullptr;
  int err = rt->host_alloc(&probe, 64, kCudaHostAllocPortable);
  if (err != 0 || probe == nullptr)
    throw std::runtime_error("a CUDA runtime was loaded but cudaHostAlloc failed (CUDA error " + std::to_string(err) +
                             "): no usable GPU or driver");
  rt->free_host(probe);
  runtimes.push_back(std::move(rt));
  return Allocator{pinned_alloc, pinned_free, runtimes.back().get()};
}

}  // namespace tailrank
