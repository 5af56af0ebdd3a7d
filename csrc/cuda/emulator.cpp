// The emulation runtime: fibers, barriers, per-block shared memory.
#include "cuda/emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

// A hand-written switch on x86-64: six callee-saved registers and the FP
// control words, no system call (swapcontext saves the signal mask with one,
// which makes it some fifty times slower). Elsewhere, ucontext.
#if defined(__x86_64__) && !defined(LK_EMU_UCONTEXT)
#define LK_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if LK_EMU_ASM_SWITCH
extern "C" void lk_emu_switch(void** save_sp, void* next_sp);
extern "C" void lk_emu_fiber_start();
#endif

namespace lk::emu {

namespace detail {

constinit thread_local ThreadState t_state;

namespace {

#if LK_EMU_ASM_SWITCH

// lk_emu_switch(save, next): pushes the callee-saved registers and the
// MXCSR/x87 control words on the current stack, stores the stack pointer in
// *save, loads next and pops the same from there. A new fiber's stack is laid
// out so that this "returns" into lk_emu_fiber_start with the entry function
// in rbx and the stack aligned as after a call.
asm(R"(
  .text
  .p2align 4
  .globl lk_emu_switch
  .hidden lk_emu_switch
  .type lk_emu_switch, @function
lk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lk_emu_switch, .-lk_emu_switch

  .p2align 4
  .globl lk_emu_fiber_start
  .hidden lk_emu_fiber_start
  .type lk_emu_fiber_start, @function
lk_emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  callq *%rbx
  ud2
  .cfi_endproc
  .size lk_emu_fiber_start, .-lk_emu_fiber_start
)");

struct Context {
  void* sp = nullptr;
};

void make_context(Context& c, void* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack) + size;
  top &= ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  slot[-1] = reinterpret_cast<uint64_t>(&lk_emu_fiber_start);
  slot[-2] = 0;                                   // rbp
  slot[-3] = reinterpret_cast<uint64_t>(entry);  // rbx
  slot[-4] = slot[-5] = slot[-6] = slot[-7] = 0;  // r12..r15
  slot[-8] = 0x1F80 | (uint64_t{0x037F} << 32);   // default MXCSR, x87 control word
  c.sp = &slot[-8];
}

inline void switch_context(Context& from, Context& to) { lk_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, void* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Deep enough for the kernels' locals and for unwinding an exception; a
// fiber that overflows hits the guard page below its stack and faults
// instead of corrupting a neighbour's stack.
constexpr size_t kStackBytes = 64 * 1024;

class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    guard_ = page;
    void* p = mmap(nullptr, kStackBytes + guard_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, guard_, PROT_NONE);
    base_ = static_cast<char*>(p);
  }
  ~Stack() { munmap(base_, kStackBytes + guard_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* bottom() const { return base_ + guard_; }

 private:
  char* base_ = nullptr;
  size_t guard_ = 0;
};

enum class FiberState { runnable, at_barrier, done };

}  // namespace

struct Fiber {
  Context ctx;
  Stack stack;
  uint3 tid{};
  FiberState state = FiberState::runnable;
  unsigned barriers = 0;  // __syncthreads passed, plus the one waited at
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  size_t shared_decls = 0;  // shared objects declared so far
  std::exception_ptr error;
};

struct SharedDecl {
  size_t offset, bytes;
};

struct Worker {
  Context scheduler;
  std::vector<std::unique_ptr<Fiber>> fibers;  // grown to the largest block seen
  alignas(64) unsigned char arena[kMaxSharedBytes];
  size_t dirty = kMaxSharedBytes;  // arena bytes to poison before the next block
  size_t dynamic_bytes = 0;        // the launch's dynamic shared memory, at offset 0
  size_t shared_end = 0;           // end of the static shared objects of this block
  std::vector<SharedDecl> decls;   // this block's static shared objects, in order
  const KernelCall* call = nullptr;

  void run_block(unsigned nthreads, uint3 block);
};

namespace {

std::string where(const uint3& v) {
  std::ostringstream os;
  os << '(' << v.x << ',' << v.y << ',' << v.z << ')';
  return os.str();
}

std::string barrier_name(const Fiber& f) {
  std::ostringstream os;
  os << "__syncthreads #" << f.barriers << " at " << f.barrier_file << ':' << f.barrier_line;
  return os.str();
}

void fiber_entry() {
  ThreadState& st = t_state;
  Fiber* f = st.fiber;
  try {
    st.worker->call->run();
  } catch (...) {
    f->error = std::current_exception();
  }
  f->state = FiberState::done;
  switch_context(f->ctx, t_state.worker->scheduler);
  std::abort();  // a finished fiber is never resumed
}

}  // namespace

void Worker::run_block(unsigned nthreads, uint3 block) {
  ThreadState& st = t_state;
  st.block_idx = block;
  // Bytes that look like NaN in every float type, so a kernel that reads a
  // tile before writing it (or after a previous block did) computes NaN.
  std::memset(arena, 0xFF, dirty);
  dirty = dynamic_bytes;
  shared_end = (dynamic_bytes + 15) & ~size_t(15);
  decls.clear();

  while (fibers.size() < nthreads) fibers.push_back(std::make_unique<Fiber>());
  const dim3 bd = st.block_dim;
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = *fibers[i];
    f.tid = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    f.state = FiberState::runnable;
    f.barriers = 0;
    f.shared_decls = 0;
    f.error = nullptr;
    make_context(f.ctx, f.stack.bottom(), kStackBytes, &fiber_entry);
  }

  for (;;) {
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = *fibers[i];
      if (f.state != FiberState::runnable) continue;
      st.fiber = &f;
      st.thread_idx = f.tid;
      switch_context(scheduler, f.ctx);
      st.fiber = nullptr;
      dirty = std::max(dirty, shared_end);
      if (f.error) std::rethrow_exception(f.error);
    }
    // Every fiber has now either returned or stopped at a barrier.
    const Fiber* waiting = nullptr;
    const Fiber* finished = nullptr;
    for (unsigned i = 0; i < nthreads; ++i) {
      const Fiber& f = *fibers[i];
      if (f.state == FiberState::done) {
        if (!finished) finished = &f;
        continue;
      }
      if (!waiting) {
        waiting = &f;
      } else if (f.barriers != waiting->barriers || f.barrier_line != waiting->barrier_line ||
                 std::strcmp(f.barrier_file, waiting->barrier_file) != 0) {
        throw KernelError("barrier divergence in block " + where(block) + ": thread " + where(waiting->tid) +
                          " waits at " + barrier_name(*waiting) + ", thread " + where(f.tid) + " at " +
                          barrier_name(f));
      }
    }
    if (!waiting) return;
    if (finished)
      throw KernelError("barrier divergence in block " + where(block) + ": thread " + where(finished->tid) +
                        " returned while thread " + where(waiting->tid) + " waits at " + barrier_name(*waiting));
    for (unsigned i = 0; i < nthreads; ++i) fibers[i]->state = FiberState::runnable;
  }
}

void* shared_alloc(size_t bytes, size_t align) {
  ThreadState& st = t_state;
  if (!st.fiber) throw KernelError("shared memory declared outside a kernel");
  Worker& w = *st.worker;
  const size_t k = st.fiber->shared_decls++;
  if (k < w.decls.size()) {
    // Another thread of this block declared it first: the same object.
    if (w.decls[k].bytes != bytes)
      throw KernelError("thread " + where(st.thread_idx) + " declares shared object #" + std::to_string(k) +
                        " with a different size than other threads of its block");
    return w.arena + w.decls[k].offset;
  }
  const size_t offset = (w.shared_end + align - 1) / align * align;
  if (offset + bytes > kMaxSharedBytes)
    throw KernelError("block " + where(st.block_idx) + " uses more than " + std::to_string(kMaxSharedBytes) +
                      " bytes of shared memory (" + std::to_string(w.dynamic_bytes) + " dynamic)");
  w.decls.push_back({offset, bytes});
  w.shared_end = offset + bytes;
  return w.arena + offset;
}

void* dynamic_shared(size_t* bytes) {
  ThreadState& st = t_state;
  if (!st.fiber) throw KernelError("shared memory used outside a kernel");
  *bytes = st.worker->dynamic_bytes;
  return st.worker->arena;
}

void shared_out_of_bounds(long long index, long long size) {
  const ThreadState& st = t_state;
  throw KernelError("shared memory index " + std::to_string(index) + " out of bounds [0, " + std::to_string(size) +
                    ") in block " + where(st.block_idx) + ", thread " + where(st.thread_idx));
}

namespace {

// Workers (fiber stacks and arenas) outlive launches; an OS thread borrows
// one for the length of a launch.
std::mutex g_pool_mutex;
std::vector<std::unique_ptr<Worker>> g_pool;
std::atomic<int> g_threads{0};

std::unique_ptr<Worker> borrow_worker() {
  std::lock_guard lock(g_pool_mutex);
  if (g_pool.empty()) return std::make_unique<Worker>();
  auto w = std::move(g_pool.back());
  g_pool.pop_back();
  return w;
}

void return_worker(std::unique_ptr<Worker> w) {
  std::lock_guard lock(g_pool_mutex);
  g_pool.push_back(std::move(w));
}

void check_config(dim3 grid, dim3 block, size_t dynamic_bytes) {
  const auto fail = [&](const std::string& what) {
    throw KernelError("invalid launch configuration: " + what + " (grid " +
                      where({grid.x, grid.y, grid.z}) + ", block " + where({block.x, block.y, block.z}) + ")");
  };
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    fail("a dimension is zero");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 ||
      uint64_t{block.x} * block.y * block.z > kMaxBlockThreads)
    fail("too many threads per block");
  if (grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) fail("grid too large");
  if (dynamic_bytes > kMaxSharedBytes) fail("too much dynamic shared memory");
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t dynamic_bytes, const KernelCall& call) {
  if (t_state.fiber) throw KernelError("kernels cannot launch kernels here");
  check_config(grid, block, dynamic_bytes);
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  const unsigned nthreads = block.x * block.y * block.z;
  const int workers = static_cast<int>(std::min<uint64_t>(nblocks, static_cast<uint64_t>(threads())));

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto work = [&] {
    std::unique_ptr<Worker> w;
    try {
      w = borrow_worker();
    } catch (...) {
      std::lock_guard lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
      return;
    }
    w->call = &call;
    w->dynamic_bytes = dynamic_bytes;
    ThreadState& st = t_state;
    st.worker = w.get();
    st.grid_dim = grid;
    st.block_dim = block;
    while (!failed.load(std::memory_order_relaxed)) {
      const uint64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= nblocks) break;
      const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
      try {
        w->run_block(nthreads, idx);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
    st.worker = nullptr;
    return_worker(std::move(w));
  };

  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers > 0 ? workers - 1 : 0));
  for (int i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace detail

void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("threads: must be at least 1");
  detail::g_threads = n;
}

int threads() {
  int n = detail::g_threads.load();
  if (n > 0) return n;
  if (const char* env = std::getenv("LK_EMU_THREADS")) n = std::atoi(env);
  if (n < 1) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  detail::g_threads = n;
  return n;
}

void sync_threads(const char* file, int line) {
  detail::ThreadState& st = detail::t_state;
  detail::Fiber* f = st.fiber;
  if (!f) throw KernelError("__syncthreads outside a kernel");
  f->barrier_file = file;
  f->barrier_line = line;
  ++f->barriers;
  f->state = detail::FiberState::at_barrier;
  detail::switch_context(f->ctx, st.worker->scheduler);
}

}  // namespace lk::emu
