// Pinned (page-locked) host memory from the CUDA runtime, loaded with dlopen at run time (the core
// never links CUDA), for staging the assembler's tensors before host-to-device copies.
#pragma once

#include <string>

#include "pairs.hpp"

namespace tailrank {

/// An allocator over cudaHostAlloc / cudaFreeHost. `library`: a libcudart path or soname; empty
/// tries the process's already-loaded runtime, then the usual sonames. Throws runtime_error saying
/// what was tried when no CUDA runtime can be loaded.
Allocator pinned_allocator(const std::string& library = "");

}  // namespace tailrank
