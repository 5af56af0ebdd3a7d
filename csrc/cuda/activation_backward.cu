// ReLU backward and the fused softmax + cross-entropy loss, forward and
// backward. Cross-entropy runs a thread per line (neighbouring threads on
// neighbouring lines: coalesced when inner > 1, and the classes of a line
// stay in one thread's cache lines when inner == 1); the reductions to one
// value are a single block, summing in a fixed order (deterministic).
#include "cuda/activation_backward.cuh"

#include "cuda/common.cuh"

namespace lk::cuda {

namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
    relu_backward_kernel(const T* go, const T* y, T* gi, long long n) {
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  // torch's threshold_backward: zero where output <= 0; a NaN output passes.
  if (e < n) gi[e] = y[e] <= T(0) ? T(0) : go[e];
}

struct Lines {
  long long lines, classes, inner;
  long long ignore_index;
};

__device__ __forceinline__ long long line_start(const Lines& s, long long line) {
  return line / s.inner * s.classes * s.inner + line % s.inner;
}

// The line's maximum and log of its sum of exp(x - max).
template <class T>
__device__ __forceinline__ void line_lse(const T* xl, const Lines& s, T& mx, T& log_sum) {
  mx = dev::neg_inf<T>();
  for (long long c = 0; c < s.classes; ++c) {
    const T v = xl[c * s.inner];
    mx = v > mx ? v : mx;
  }
  T sum = T(0);
  for (long long c = 0; c < s.classes; ++c) sum += dev::exp(xl[c * s.inner] - mx);
  log_sum = dev::log(sum);
}

// Per line: the loss (0 when ignored, NaN for a target out of range) and
// whether it counts toward the mean.
template <class T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_lines_kernel(Lines s, const T* __restrict__ x, const int64_t* __restrict__ target,
                               T* __restrict__ loss, long long* __restrict__ counted) {
  const long long l = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (l >= s.lines) return;
  const long long t = target[l];
  T v;
  if (t == s.ignore_index) {
    v = T(0);
  } else if (t < 0 || t >= s.classes) {
    v = static_cast<T>(NAN);
  } else {
    const T* xl = x + line_start(s, l);
    T mx, log_sum;
    line_lse(xl, s, mx, log_sum);
    v = (mx + log_sum) - xl[t * s.inner];
  }
  loss[l] = v;
  if (counted) counted[l] = t != s.ignore_index;
}

// One block: out[0] = the sum of the line losses, divided by the lines
// counted when `mean`.
template <class T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_reduce_kernel(const T* __restrict__ loss, const long long* __restrict__ counted, long long lines,
                                bool mean, T* __restrict__ out) {
  using Sums = SharedArray<T, kThreads>;
  using Counts = SharedArray<long long, kThreads>;
  LK_SHARED(Sums, sums);
  LK_SHARED(Counts, counts);
  T acc = T(0);
  long long n = 0;
  for (long long l = threadIdx.x; l < lines; l += kThreads) {
    acc += loss[l];
    n += counted[l];
  }
  acc = block_reduce<kThreads>(acc, sums, [](T a, T b) { return a + b; });
  n = block_reduce<kThreads>(n, counts, [](long long a, long long b) { return a + b; });
  if (threadIdx.x == 0) out[0] = mean ? acc / static_cast<T>(n) : acc;
}

// One block: count[0] = the lines whose target is not ignore_index.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_count_kernel(Lines s, const int64_t* __restrict__ target, long long* __restrict__ count) {
  using Counts = SharedArray<long long, kThreads>;
  LK_SHARED(Counts, counts);
  long long n = 0;
  for (long long l = threadIdx.x; l < s.lines; l += kThreads) n += target[l] != s.ignore_index;
  n = block_reduce<kThreads>(n, counts, [](long long a, long long b) { return a + b; });
  if (threadIdx.x == 0) count[0] = n;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(Lines s, const T* __restrict__ grad_loss, bool per_line,
                                  const long long* __restrict__ count, const T* __restrict__ x,
                                  const int64_t* __restrict__ target, T* __restrict__ gi) {
  const long long l = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (l >= s.lines) return;
  const long long start = line_start(s, l);
  const T* xl = x + start;
  T* gl = gi + start;
  const long long t = target[l];
  if (t == s.ignore_index) {
    for (long long c = 0; c < s.classes; ++c) gl[c * s.inner] = T(0);
    return;
  }
  T g = per_line ? grad_loss[l] : grad_loss[0];
  if (count) g /= static_cast<T>(count[0]);
  if (t < 0 || t >= s.classes) {
    for (long long c = 0; c < s.classes; ++c) gl[c * s.inner] = static_cast<T>(NAN);
    return;
  }
  T mx, log_sum;
  line_lse(xl, s, mx, log_sum);
  for (long long c = 0; c < s.classes; ++c) {
    const T p = dev::exp((xl[c * s.inner] - mx) - log_sum);
    gl[c * s.inner] = g * (c == t ? p - T(1) : p);
  }
}

void check_lines(int64_t outer, int64_t classes, int64_t inner) {
  require(outer >= 0 && inner >= 0, "input: sizes must not be negative");
  require(classes > 0, "input: expected at least one class");
  require(ceil_div(outer * inner, kThreads) <= kInt32Max, "input: too large for one GPU grid");
}

dim3 line_grid(long long lines) { return dim3(static_cast<unsigned>(ceil_div(lines, kThreads))); }

template <class T>
void run_relu_backward(const T* go, const T* y, T* gi, int64_t n, Stream stream) {
  require(n >= 0, "relu_backward: size must not be negative");
  if (n == 0) return;
  require(ceil_div(n, kThreads) <= kInt32Max, "input: too large for one GPU grid");
  launch(&relu_backward_kernel<T>, line_grid(n), dim3(kThreads), 0, stream, go, y, gi, static_cast<long long>(n));
}

template <class T>
void run_cross_entropy(const T* x, const int64_t* target, T* loss, int64_t outer, int64_t classes, int64_t inner,
                       Reduction reduction, int64_t ignore_index, Stream stream) {
  check_lines(outer, classes, inner);
  const Lines s{outer * inner, classes, inner, ignore_index};
  if (reduction == Reduction::none) {
    if (s.lines)
      launch(&cross_entropy_lines_kernel<T>, line_grid(s.lines), dim3(kThreads), 0, stream, s, x, target, loss,
             static_cast<long long*>(nullptr));
    return;
  }
  // Line losses into a workspace, then one block adds them up (also for no
  // lines: the result is written either way).
  const size_t n = static_cast<size_t>(s.lines > 0 ? s.lines : 1);  // no zero-byte allocations
  Workspace<T> lines(n, stream);
  Workspace<long long> counted(n, stream);
  if (s.lines)
    launch(&cross_entropy_lines_kernel<T>, line_grid(s.lines), dim3(kThreads), 0, stream, s, x, target, lines.get(),
           counted.get());
  launch(&cross_entropy_reduce_kernel<T>, dim3(1), dim3(kThreads), 0, stream, static_cast<const T*>(lines.get()),
         static_cast<const long long*>(counted.get()), s.lines, reduction == Reduction::mean, loss);
}

template <class T>
void run_cross_entropy_backward(const T* grad_loss, const T* x, const int64_t* target, T* gi, int64_t outer,
                                int64_t classes, int64_t inner, Reduction reduction, int64_t ignore_index,
                                Stream stream) {
  check_lines(outer, classes, inner);
  const Lines s{outer * inner, classes, inner, ignore_index};
  if (s.lines == 0) return;
  const bool mean = reduction == Reduction::mean;
  Workspace<long long> count(1, stream);
  if (mean)
    launch(&cross_entropy_count_kernel, dim3(1), dim3(kThreads), 0, stream, s, target, count.get());
  launch(&cross_entropy_backward_kernel<T>, line_grid(s.lines), dim3(kThreads), 0, stream, s, grad_loss,
         reduction == Reduction::none, static_cast<const long long*>(mean ? count.get() : nullptr),
         x, target, gi);
}

}  // namespace

void relu_backward(const float* grad_output, const float* output, float* grad_input, int64_t n, Stream stream) {
  run_relu_backward(grad_output, output, grad_input, n, stream);
}
void relu_backward(const double* grad_output, const double* output, double* grad_input, int64_t n, Stream stream) {
  run_relu_backward(grad_output, output, grad_input, n, stream);
}

void cross_entropy(const float* x, const int64_t* target, float* loss, int64_t outer, int64_t classes,
                   int64_t inner, Reduction reduction, int64_t ignore_index, Stream stream) {
  run_cross_entropy(x, target, loss, outer, classes, inner, reduction, ignore_index, stream);
}
void cross_entropy(const double* x, const int64_t* target, double* loss, int64_t outer, int64_t classes,
                   int64_t inner, Reduction reduction, int64_t ignore_index, Stream stream) {
  run_cross_entropy(x, target, loss, outer, classes, inner, reduction, ignore_index, stream);
}

void cross_entropy_backward(const float* grad_loss, const float* x, const int64_t* target, float* grad_input,
                            int64_t outer, int64_t classes, int64_t inner, Reduction reduction,
                            int64_t ignore_index, Stream stream) {
  run_cross_entropy_backward(grad_loss, x, target, grad_input, outer, classes, inner, reduction, ignore_index,
                             stream);
}
void cross_entropy_backward(const double* grad_loss, const double* x, const int64_t* target, double* grad_input,
                            int64_t outer, int64_t classes, int64_t inner, Reduction reduction,
                            int64_t ignore_index, Stream stream) {
  run_cross_entropy_backward(grad_loss, x, target, grad_input, outer, classes, inner, reduction, ignore_index,
                             stream);
}

}  // namespace lk::cuda
