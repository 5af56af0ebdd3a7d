// A process-wide pool of worker threads. parallel_for may be called from
// many threads at once: each call is a job of its own, the caller works on its
// own job too, and idle workers help whichever job is queued first.
#pragma once
#include <cstdint>
#include <functional>

namespace lk {

// Threads the process may run on (CPU affinity), at least 1.
int available_cores();

int get_num_threads();
constexpr int kMaxThreads = 4096;

// 1 <= n <= kMaxThreads: total threads a call may use, the calling thread
// included. If the system cannot start them, the pool stays as it was and
// std::system_error is thrown.
void set_num_threads(int n);

// Runs fn(task) for every task in [0, n_tasks) on at most max_threads threads
// (0: all of the pool), and returns when all are done. The first exception a
// task throws is rethrown here once every task has finished. Calls made from
// inside a task run serially in that task's thread.
void parallel_for(int64_t n_tasks, int max_threads, const std::function<void(int64_t)>& fn);

}  // namespace lk
