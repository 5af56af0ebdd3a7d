#include "cpu/machine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The microkernel on L1-resident panels: the best a GEMM can do per thread.
template <class T>
double measure_gemm(const GemmUkernel<T>& uk) {
  const int64_t kc = 256;
  auto a = aligned_alloc_array<T>(kc * uk.mr), b = aligned_alloc_array<T>(kc * uk.nr);
  auto c = aligned_alloc_array<T>(uk.mr * uk.nr);
  for (int64_t i = 0; i < kc * uk.mr; ++i) a[i] = T(1e-3) * static_cast<T>(i % 7);
  for (int64_t i = 0; i < kc * uk.nr; ++i) b[i] = T(1e-3) * static_cast<T>(i % 5);
  GemmEpilogue<T> ep;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const int calls = 400;
    const auto t0 = Clock::now();
    for (int i = 0; i < calls; ++i) uk.packed(kc, a.get(), 0, b.get(), c.get(), uk.nr, uk.mr, uk.nr, ep);
    best = std::max(best, 2.0 * uk.mr * uk.nr * kc * calls / seconds_since(t0));
  }
  return best;
}

double measure_bandwidth() {
  const size_t bytes = size_t{32} << 20;  // well past any L3 share on the machines we target
  auto src = aligned_alloc_array<unsigned char>(bytes), dst = aligned_alloc_array<unsigned char>(bytes);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 2, bytes);
  double best = 0;
  for (int rep = 0; rep < 2; ++rep) {
    const auto t0 = Clock::now();
    std::memcpy(dst.get(), src.get(), bytes);
    // The copy must not be optimised away as dead.
    __asm__ volatile("" : : "r"(dst.get()) : "memory");
    best = std::max(best, 2.0 * bytes / seconds_since(t0));
  }
  return best;
}

void spin_for(double seconds) {
  const auto t0 = Clock::now();
  while (seconds_since(t0) < seconds) {
  }
}

// Two tasks of 20 us each: with a worker helping they take 20 us plus the
// hand-over; the excess is what handing work to the pool costs in a stream
// of calls (the workers spin between calls, so none sleeps here: a first
// long job wakes them).
double measure_wake() {
  if (get_num_threads() < 2) return 0;
  parallel_for(2, 2, [&](int64_t) { spin_for(2e-3); });
  const double task = 20e-6;
  double best = 1;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = Clock::now();
    parallel_for(2, 2, [&](int64_t) { spin_for(task); });
    best = std::min(best, seconds_since(t0) - task);
  }
  return std::max(best, 0.0);
}

MachineModel measure(Isa isa) {
  const UkernelTable& t = ukernels(isa);
  MachineModel m;
  m.isa = isa;
  for (int shape = 0; shape < kGemmShapes; ++shape) {
    m.gemm_flops[0][shape] = measure_gemm(t.f32_gemm[shape]);
    m.gemm_flops[1][shape] = measure_gemm(t.f64_gemm[shape]);
  }
  m.bandwidth = measure_bandwidth();
  m.wake_s = measure_wake();
  m.wake_measured = get_num_threads() >= 2;
  return m;
}

}  // namespace

double fma_peak_flops(int threads) {
  const FmaPeakUkernel& k = ukernels().f32_fma_peak;
  threads = std::clamp(threads, 1, get_num_threads());
  const int64_t iters = int64_t{1} << 18;  // a few milliseconds a task
  std::vector<float> sink(static_cast<size_t>(threads));
  double best = 0;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    parallel_for(threads, threads, [&](int64_t t) { sink[static_cast<size_t>(t)] = k.fn(iters); });
    best = std::max(best, 2.0 * k.lanes * static_cast<double>(iters) * threads / seconds_since(t0));
  }
  __asm__ volatile("" : : "r"(sink.data()) : "memory");
  return best;
}

std::string MachineModel::describe() const {
  std::string s = cat("isa=", isa_name(isa), " gemm_gflops_per_thread=");
  for (int shape = 0; shape < kGemmShapes; ++shape)
    s += cat(shape ? ", " : "", gemm_flops[0][shape] * 1e-9, "/", gemm_flops[1][shape] * 1e-9);
  return s + cat(" (f32/f64 per microkernel shape) bandwidth_gbs=", bandwidth * 1e-9, " wake_us=", wake_s * 1e6);
}

const MachineModel& machine_model() {
  static std::mutex mu;
  static MachineModel* models[3] = {};
  const Isa isa = active_isa();
  std::lock_guard<std::mutex> lock(mu);
  MachineModel*& m = models[static_cast<int>(isa)];
  if (m == nullptr) {
    m = new MachineModel(measure(isa));
  } else if (!m->wake_measured && get_num_threads() >= 2) {
    // Measured while the pool had one thread, the hand-over looked free: with
    // it, plans would give a second thread even a sub-microsecond job (and
    // keep it spinning). Measured now, in a new model, since callers may hold
    // the old one; it stays allocated for them.
    static std::vector<std::unique_ptr<MachineModel>> replaced;
    replaced.emplace_back(m);
    m = new MachineModel(*m);
    m->wake_s = measure_wake();
    m->wake_measured = true;
  }
  return *m;
}

}  // namespace lk::cpu
