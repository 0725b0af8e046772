#include "thread_pool.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common.hpp"

namespace tailrank {

namespace {

constexpr size_t kMaxWorkers = 255;  // the pool's bound, whatever hardware_concurrency says

struct Job {
  const std::function<void(size_t)>* fn;
  size_t n;
  size_t helpers_wanted;
  size_t helpers_joined = 0;  // guarded by the pool's mutex
  std::atomic<size_t> next{0};
  std::atomic<size_t> active{0};
  std::mutex mu;
  std::condition_variable idle;
  std::exception_ptr error;

  void work() {
    for (;;) {
      size_t i = next.fetch_add(1);
      if (i >= n) return;
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!error) error = std::current_exception();
        next.store(n);
        return;
      }
    }
  }
};

class Pool {
 public:
  void ensure_workers(size_t want) {
    std::lock_guard<std::mutex> g(mu_);
    want = std::min(want, kMaxWorkers);
    while (workers_.size() < want) {
      try {
        workers_.emplace_back([this] { loop(); });
      } catch (const std::system_error& e) {
        throw std::runtime_error(std::string("cannot start the core's worker threads: ") + e.what());
      }
    }
  }

  size_t workers() {
    std::lock_guard<std::mutex> g(mu_);
    return workers_.size();
  }

  void run(Job& job) {
    {
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back(&job);
    }
    cv_.notify_all();
    job.work();
    {
      // After this no worker can join: the set of helpers (job.active) is final.
      std::lock_guard<std::mutex> g(mu_);
      auto it = std::find(queue_.begin(), queue_.end(), &job);
      if (it != queue_.end()) queue_.erase(it);
    }
    std::unique_lock<std::mutex> lk(job.mu);
    job.idle.wait(lk, [&] { return job.active.load() == 0; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return !queue_.empty(); });
      Job* job = queue_.front();
      if (++job->helpers_joined >= job->helpers_wanted || job->next.load() >= job->n) queue_.pop_front();
      job->active.fetch_add(1);
      lk.unlock();
      job->work();
      {
        std::lock_guard<std::mutex> g(job->mu);
        job->active.fetch_sub(1);
        job->idle.notify_all();
      }
      lk.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
};

std::atomic<Pool*> g_pool{nullptr};

// A forked child has none of the parent's threads (and maybe a locked pool mutex): it abandons
// the parent's pool and starts its own on first use.
void forget_pool_in_child() { g_pool.store(nullptr); }

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)registered;
  auto* fresh = new Pool();
  if (!g_pool.compare_exchange_strong(p, fresh)) {
    delete fresh;
    return *p;
  }
  return *fresh;
}

}  // namespace

void pool_run(size_t n, size_t threads, const std::function<void(size_t)>& fn) {
  if (threads == 0) threads = default_threads();
  threads = std::min(threads, n);
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Pool& p = pool();
  p.ensure_workers(std::min(default_threads(), kMaxWorkers + 1) - 1);
  Job job;
  job.fn = &fn;
  job.n = n;
  job.helpers_wanted = threads - 1;
  p.run(job);
  if (job.error) std::rethrow_exception(job.error);
}

size_t pool_workers() {
  Pool* p = g_pool.load();
  return p ? p->workers() : 0;
}

}  // namespace tailrank
