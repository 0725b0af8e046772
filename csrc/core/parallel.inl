#pragma once
#include <functional>

#include "thread_pool.hpp"

namespace tailrank {

template <class Fn>
void parallel_for(size_t n, size_t threads, Fn&& fn) {
  pool_run(n, threads, std::function<void(size_t)>(std::ref(fn)));
}

}  // namespace tailrank
