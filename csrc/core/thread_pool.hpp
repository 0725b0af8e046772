// One persistent, bounded pool of worker threads for the core's parallel work.
#pragma once

#include <cstddef>
#include <functional>

namespace tailrank {

/// Runs fn(i) for i in [0, n) on the calling thread plus up to `threads - 1` pool workers
/// (threads == 0: one per hardware thread). The caller always takes part, so nested or concurrent
/// calls make progress even when every worker is busy. The first exception thrown by fn stops
/// the remaining items and is rethrown on the caller. Workers are started once per process (and
/// again in a forked child); a failure to start them throws std::runtime_error.
void pool_run(size_t n, size_t threads, const std::function<void(size_t)>& fn);

/// Worker threads the pool holds now (0 before the first parallel call).
size_t pool_workers();

}  // namespace tailrank
