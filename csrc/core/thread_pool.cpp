#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#endif

namespace lk {

int available_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

namespace {

struct Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> seats{0};  // workers that may still join
  std::mutex error_mu;
  std::exception_ptr error;

  void work() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      try {
        (*fn)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) done.notify_all();
    }
  }
};

thread_local bool t_inside_task = false;

// The CPU the calling thread runs on, or -1 where that is unknown.
int current_cpu() {
#ifdef __linux__
  return sched_getcpu();
#else
  return -1;
#endif
}

// A worker on the CPU of the thread it is to help only takes turns with it
// on one core: every call runs at half speed, for milliseconds, until the
// system's load balancer separates them. The system's wake-up placement does
// put a worker there, notably when another library's threads ran on the other
// CPUs shortly before. Moving away at once costs two system calls: narrowing
// the affinity migrates the thread, restoring it lets it move freely again.
void leave_cpu(int cpu) {
#ifdef __linux__
  if (cpu < 0 || sched_getcpu() != cpu) return;
  cpu_set_t mask;
  if (pthread_getaffinity_np(pthread_self(), sizeof(mask), &mask) != 0) return;
  cpu_set_t others = mask;
  CPU_CLR(cpu, &others);
  if (CPU_COUNT(&others) == 0) return;  // pinned there (LEPTON_PIN_THREADS), or a single CPU
  if (pthread_setaffinity_np(pthread_self(), sizeof(others), &others) == 0)
    pthread_setaffinity_np(pthread_self(), sizeof(mask), &mask);
#else
  (void)cpu;
#endif
}

class Pool {
 public:
  explicit Pool(int threads) { start(threads); }
  ~Pool() { stop(); }

  int threads() const { return threads_; }

  void resize(int threads) {
    std::unique_lock<std::shared_mutex> lock(resize_mu_);
    const int before = threads_;
    stop();
    try {
      start(threads);
    } catch (...) {  // the system refused a thread: keep the pool as it was
      stop();
      start(before);
      throw;
    }
  }

  void run(int64_t n, int max_threads, const std::function<void(int64_t)>& fn) {
    std::shared_lock<std::shared_mutex> lock(resize_mu_);
    int want = max_threads > 0 ? std::min(max_threads, threads_) : threads_;
    if (static_cast<int64_t>(want) > n) want = static_cast<int>(n);
    if (want <= 1 || t_inside_task) {
      const bool outer = t_inside_task;
      t_inside_task = true;
      struct Restore { bool v; ~Restore() { t_inside_task = v; } } restore{outer};
      for (int64_t t = 0; t < n; ++t) fn(t);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    job->seats.store(want - 1);
    caller_cpu_.store(current_cpu(), std::memory_order_relaxed);
    int sleeping;
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      queue_.push_back(job);
      queued_.fetch_add(1, std::memory_order_release);
      sleeping = sleepers_;
    }
    // Spinning workers see the job by themselves; only sleeping ones need a
    // (system call) wake-up.
    if (sleeping >= want - 1) queue_cv_.notify_all();
    else for (int i = 0; i < std::min(sleeping, want - 1); ++i) queue_cv_.notify_one();

    t_inside_task = true;
    job->work();
    t_inside_task = false;
    // Tasks still running on workers: wait for them. Spin briefly first, since
    // most tasks are short and a sleeping wake-up costs microseconds (tens in
    // a virtual machine). Then give the core away while still awake: on an
    // oversubscribed machine the worker we wait for may be queued behind this
    // very thread, and a pause loop would keep it off the core. Sleep last.
    for (int spin = 0; spin < 2000 && job->done.load(std::memory_order_acquire) < n; ++spin) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    if (job->done.load(std::memory_order_acquire) < n) {
      const auto until = std::chrono::steady_clock::now() + kYield;
      while (job->done.load(std::memory_order_acquire) < n && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
    }
    for (int64_t d; (d = job->done.load(std::memory_order_acquire)) < n;) job->done.wait(d);
    {
      // The job may still sit in the queue if no worker came for it.
      std::lock_guard<std::mutex> q(queue_mu_);
      auto it = std::find(queue_.begin(), queue_.end(), job);
      if (it != queue_.end()) {
        queue_.erase(it);
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void start(int threads) {
    stopping_ = false;
    stop_flag_.store(false, std::memory_order_relaxed);
    threads_ = 1;
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    threads_ = std::max(1, threads);
    pin_workers();
  }

  // Opt-in (LEPTON_PIN_THREADS=1): worker i stays on the i-th CPU the
  // process may use (modulo their count), leaving the first to the caller.
  // For reproducible benchmarks on a quiet machine; by default the system
  // places threads, which copes better with other processes.
  void pin_workers() {
#ifdef __linux__
    const char* env = std::getenv("LEPTON_PIN_THREADS");
    if (env == nullptr || env[0] != '1' || env[1] != '\0') return;
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    if (cpus.size() < 2) return;
    for (size_t i = 0; i < workers_.size(); ++i) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpus[(i + 1) % cpus.size()], &one);
      pthread_setaffinity_np(workers_[i].native_handle(), sizeof(one), &one);  // best effort
    }
#endif
  }

  void stop() {
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      stopping_ = true;
    }
    stop_flag_.store(true, std::memory_order_relaxed);
    queue_cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void worker_loop() {
#ifdef __linux__
    pthread_setname_np(pthread_self(), "lepton-worker");  // for top, perf and debuggers
#endif
    t_inside_task = true;
    for (;;) {
      // Spin a while before sleeping: calls come in streams, and a spinning
      // worker joins the next job at once, where a sleeping one costs the
      // caller a system call and often the whole job (it finishes alone).
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; queued_.load(std::memory_order_acquire) == 0 && !stop_flag_.load(std::memory_order_relaxed);
           ++i) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        if ((i & 255) == 255) {
          leave_cpu(caller_cpu_.load(std::memory_order_relaxed));
          if (std::chrono::steady_clock::now() > until) break;
        }
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> q(queue_mu_);
        if (queue_.empty() && !stopping_) {
          ++sleepers_;
          queue_cv_.wait(q);
          --sleepers_;
          // Woken for a job that the caller has already finished alone (a
          // wake-up can take longer than a short job): spin again, so as to
          // be awake for the next call of the stream.
          if (queue_.empty() && !stopping_) continue;
        }
        if (stopping_) return;
        job = queue_.front();
        if (job->seats.fetch_sub(1) <= 1 || job->next.load() >= job->n) {
          queue_.pop_front();
          queued_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      leave_cpu(caller_cpu_.load(std::memory_order_relaxed));
      job->work();
    }
  }

  static constexpr std::chrono::microseconds kSpin{200};   // a worker between jobs, before it sleeps
  static constexpr std::chrono::microseconds kYield{1000};  // the caller waiting for workers, before it sleeps

  int threads_ = 1;
  bool stopping_ = false;
  std::atomic<bool> stop_flag_{false};  // stopping_, readable without the lock
  std::atomic<int> queued_{0};          // jobs in queue_, readable without the lock
  std::atomic<int> caller_cpu_{-1};     // where the newest job's caller ran
  int sleepers_ = 0;                    // workers waiting on queue_cv_
  std::vector<std::thread> workers_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::shared_mutex resize_mu_;
};

int initial_threads() {
  if (const char* env = std::getenv("LEPTON_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= 4096) return static_cast<int>(v);
  }
  return available_cores();
}

std::mutex g_pool_mu;
std::atomic<Pool*> g_pool{nullptr};

#ifdef __linux__
// A forked child inherits the pool object but not its threads: it abandons
// the pool (joining threads that do not exist is undefined) and starts afresh
// on first use. Checked at fork time, so that a call costs no system call.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }
#endif

Pool& pool() {
  if (Pool* p = g_pool.load(std::memory_order_acquire)) return *p;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  Pool* p = g_pool.load(std::memory_order_relaxed);
  if (p == nullptr) {
#ifdef __linux__
    static const int registered = pthread_atfork(nullptr, nullptr, &forget_pool_in_child);
    (void)registered;
#endif
    // Never destroyed: workers must not be joined during interpreter shutdown.
    p = new Pool(initial_threads());
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace

int get_num_threads() { return pool().threads(); }

void set_num_threads(int n) { pool().resize(n); }

void parallel_for(int64_t n_tasks, int max_threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  pool().run(n_tasks, max_threads, fn);
}

}  // namespace lk
