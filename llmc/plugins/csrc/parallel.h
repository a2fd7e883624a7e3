// llmc::parallel_for: at::parallel_for's contract (chunks of at least `grain`, one per thread, the call returns when
// all have run, the first exception rethrown) on llmc's own thread pool, which waits the way an LLM step needs.
//
// A decode step is a few hundred short kernels with Python between them. torch's OpenMP pool either sleeps at once
// after each kernel (OMP_WAIT_POLICY=PASSIVE, llmc's default for torch's own ops) and then takes tens of microseconds
// to wake for the next, about what a batch-1 linear takes; or spins for long (libgomp's default), and beside a busy
// process the spinning threads take the cores the step needs while the caller waits at each region's end for
// threads that have not even started. Here:
// - a worker spins for kSpin after each job (longer than the gap to the next kernel of a step, far shorter than the
//   gap between steps), then sleeps; a spin that loses its core (another process wants it) stops spinning for a while;
// - the caller never waits for a worker that has not started: chunks are claimed, not assigned, so the caller runs
//   those no one has taken and waits only for chunks in progress.
// docs/design.md#threads has the measurements.
#pragma once
#include <ATen/Parallel.h>
#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace llmc {
namespace thread_pool {

using Clock = std::chrono::steady_clock;
constexpr auto kSpin = std::chrono::microseconds(200), kPreempted = std::chrono::microseconds(50);
constexpr auto kBackOff = std::chrono::milliseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Set on pool threads and on a caller while its job runs: a parallel_for inside a chunk runs inline.
inline thread_local bool in_parallel_for = false;

class Pool {
 public:
  // body(c) for each chunk c < chunks, on this thread and up to `helpers` pool threads; rethrows the first exception.
  template <typename Body>
  void run(int64_t chunks, int64_t helpers, const Body& body) {
    std::unique_lock<std::mutex> caller(caller_, std::try_to_lock);
    if (!caller.owns_lock()) {  // another thread's job is running: this one runs alone
      for (int64_t c = 0; c < chunks; ++c) body(c);
      return;
    }
    while (static_cast<int64_t>(threads_.size()) < helpers) {
      threads_.emplace_back([this, index = static_cast<int64_t>(threads_.size())] { work(index); });
      pthread_setname_np(threads_.back().native_handle(), "llmc-worker");
      threads_.back().detach();  // the pool lives as long as the process
    }
    in_parallel_for = true;
    job_ = Job{[](const void* b, int64_t c) { (*static_cast<const Body*>(b))(c); }, &body, chunks, helpers, nullptr};
    next_.store(0);
    open_.store(++jobs_);  // publishes job_ (sequentially consistent, as are all the pool's atomics)
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    claim();
    open_.store(0);  // late workers now leave job_ alone; wait for those inside it
    for (int spins = 0; busy_.load() > 0; ++spins) spins < 1000 ? cpu_relax() : std::this_thread::yield();
    in_parallel_for = false;
    if (job_.error) std::rethrow_exception(job_.error);
  }

 private:
  struct Job {
    void (*call)(const void* body, int64_t chunk);
    const void* body;
    int64_t chunks, helpers;
    std::exception_ptr error;
  };

  void claim() {
    for (int64_t c = next_++; c < job_.chunks; c = next_++) {
      try {
        job_.call(job_.body, c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!job_.error) job_.error = std::current_exception();
      }
    }
  }

  void work(int64_t index) {
    in_parallel_for = true;
    Clock::time_point spin_from{};  // no spinning before then (see wait_for_job)
    for (uint64_t seen = 0;;) {
      seen = wait_for_job(seen, spin_from);
      ++busy_;
      if (open_.load() == seen && index < job_.helpers) claim();  // a job opened and not closed since: job_ is valid
      --busy_;
    }
  }

  // The number of a job opened since `seen`: spin for kSpin, then sleep until one opens. A spin that loses its core
  // (a long gap between two looks at the clock: another thread ran here) means more threads want the cores than there
  // are: spinning then only slows the others, so this thread sleeps at once for kBackOff before it tries again.
  uint64_t wait_for_job(uint64_t seen, Clock::time_point& spin_from) {
    uint64_t job = 0;
    const auto is_new = [&] { job = open_.load(); return job != 0 && job != seen; };
    auto now = Clock::now();
    if (now >= spin_from) {
      const auto until = now + kSpin;
      for (int spins = 1;; ++spins) {
        if (is_new()) return job;
        if (spins % 64 == 0) {
          const auto before = now;
          now = Clock::now();
          if (now - before > kPreempted) {
            spin_from = now + kBackOff;
            break;
          }
          if (now > until) break;
        }
        cpu_relax();
      }
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    ++sleeping_;  // before is_new() reads open_: a caller that opens a job after that read sees a sleeper and wakes it
    wake_.wait(lock, is_new);
    --sleeping_;
    return job;
  }

  std::mutex caller_, error_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  Job job_{};
  uint64_t jobs_ = 0;
  // Each on a cache line of its own: workers spin reading open_ while the caller and they update the others.
  alignas(64) std::atomic<uint64_t> open_{0};  // the open job's number; 0 when none is open
  alignas(64) std::atomic<int64_t> next_{0};   // its next unclaimed chunk
  alignas(64) std::atomic<int> busy_{0};
  alignas(64) std::atomic<int> sleeping_{0};
};

inline std::atomic<Pool*> pool_instance{nullptr};

inline Pool& pool() {
  static const int registered = pthread_atfork(nullptr, nullptr, [] {
    pool_instance = nullptr;  // a forked child has none of the parent's threads (and maybe its locks held): a new pool
  });
  (void)registered;
  Pool* pool = pool_instance.load();
  if (!pool) {  // never deleted: its threads outlive static destruction
    Pool* fresh = new Pool();
    if (pool_instance.compare_exchange_strong(pool, fresh)) pool = fresh;
    else delete fresh;  // another thread made one first
  }
  return *pool;
}

}  // namespace thread_pool

// f(b, e) over [begin, end) in chunks of at least `grain`, one per thread (torch.set_num_threads), as at::parallel_for.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (chunks <= 1 || thread_pool::in_parallel_for || at::in_parallel_region()) return f(begin, end);
  const int64_t size = (n + chunks - 1) / chunks;
  thread_pool::pool().run(chunks, chunks - 1, [&](int64_t c) {
    const int64_t b = begin + c * size;
    if (b < end) f(b, std::min(end, b + size));
  });
}

// f(i) for each i < n, each taken by the next free thread (as many as torch.set_num_threads): for items of uneven
// cost, and on a shared host, where a thread that loses its core leaves its items to the others instead of holding up
// a fixed share. Each item is one thread's, so results do not depend on the split.
template <typename F>
void parallel_for_each(int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), n) - 1;
  if (helpers <= 0 || thread_pool::in_parallel_for || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  thread_pool::pool().run(n, helpers, f);
}

}  // namespace llmc
