// The backward passes other than convolution's, and the Adam update.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/backward.h"
#include "cpu/gemm_strided.h"
#include "cpu/ukernels/train_ukernels.h"

namespace lk::cpu {

namespace {
// Element-wise passes: one thread per 256 K elements (a thread's hand-over
// costs about as much as streaming that many).
int threads_for_elements(double n) {
  return static_cast<int>(std::clamp(n / 256e3, 1.0, static_cast<double>(get_num_threads())));
}
constexpr int64_t kChunk = 64 * 1024;
}  // namespace

template <class T>
void linear_backward(int64_t M, int64_t K, int64_t N, const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb) {
  const double flops = 2.0 * M * K * N;
  if (gx)  // (M x N) * (N x K): grad_out's rows in place
    gemm_strided<T>(M, K, N, gy, N, 1, w, K, 1, gx, K, false, threads_for_flops(flops));
  if (gw)  // (N x M) * (M x K): grad_out transposed
    gemm_strided<T>(N, K, M, gy, 1, N, x, K, 1, gw, K, false, threads_for_flops(flops));
  if (gb) {
    std::vector<double> s(static_cast<size_t>(N), 0.0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) s[j] += gy[i * N + j];
    for (int64_t j = 0; j < N; ++j) gb[j] = static_cast<T>(s[j]);
  }
}

template <class T>
void max_pool2d_backward(int64_t planes, int64_t PQ, int64_t HW, const T* grad, const int64_t* indices, T* gx) {
  parallel_for(planes, threads_for_elements(static_cast<double>(planes) * (HW + 2 * PQ)), [&](int64_t c) {
    T* out = gx + c * HW;
    std::fill(out, out + HW, T(0));
    const T* g = grad + c * PQ;
    const int64_t* idx = indices + c * PQ;
    for (int64_t e = 0; e < PQ; ++e) {
      const int64_t i = idx[e];
      if (i < 0 || i >= HW)
        throw std::invalid_argument(cat("indices: ", i, " is out of range for an input plane of ", HW, " elements"));
      out[i] += g[e];
    }
  });
}

template <class T>
void relu_backward(int64_t n, const T* grad, const T* output, T* gx) {
  const auto fn = train_ukernels().relu_backward<T>();
  parallel_for(ceil_div(n, kChunk), threads_for_elements(static_cast<double>(n)), [&](int64_t t) {
    const int64_t b = t * kChunk;
    fn(std::min(kChunk, n - b), grad + b, output + b, gx + b);
  });
}

namespace {
// Row i's maximum and sum of exp(x - max), in double; NaN max when the row has a NaN.
template <class T>
void row_stats(const T* x, int64_t C, double& mx, double& sum) {
  mx = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const double v = x[c];
    nan |= std::isnan(v);
    mx = v > mx ? v : mx;
  }
  if (nan) {
    mx = sum = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  // A maximum of +-inf: x - max is NaN for the infinite entries, as the
  // log-sum-exp of such a row is undefined in torch's formulation too.
  sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += std::exp(static_cast<double>(x[c]) - mx);
}

void check_target(int64_t t, int64_t C, int64_t ignore_index) {
  if (t != ignore_index && (t < 0 || t >= C))
    throw std::invalid_argument(cat("target: class index ", t, " is out of range for ", C, " classes"));
}
}  // namespace

template <class T>
int64_t cross_entropy_rows(int64_t N, int64_t C, const T* x, const int64_t* target, int64_t ignore_index,
                           double* loss) {
  for (int64_t i = 0; i < N; ++i) check_target(target[i], C, ignore_index);
  parallel_for(ceil_div(N, 256), threads_for_elements(4.0 * N * C), [&](int64_t t) {
    for (int64_t i = t * 256; i < std::min(N, t * 256 + 256); ++i) {
      if (target[i] == ignore_index) {
        loss[i] = 0;
        continue;
      }
      double mx, sum;
      row_stats(x + i * C, C, mx, sum);
      // (max - x_t) first: exact for moderate logits, where max + log(sum) - x_t would cancel.
      loss[i] = (mx - static_cast<double>(x[i * C + target[i]])) + std::log(sum);
    }
  });
  int64_t counted = 0;
  for (int64_t i = 0; i < N; ++i) counted += target[i] != ignore_index;
  return counted;
}

template <class T>
void cross_entropy_backward(int64_t N, int64_t C, const T* grad, int64_t grad_stride, double divisor, const T* x,
                            const int64_t* target, int64_t ignore_index, T* gx) {
  for (int64_t i = 0; i < N; ++i) check_target(target[i], C, ignore_index);
  parallel_for(ceil_div(N, 256), threads_for_elements(4.0 * N * C), [&](int64_t t) {
    for (int64_t i = t * 256; i < std::min(N, t * 256 + 256); ++i) {
      T* g = gx + i * C;
      if (target[i] == ignore_index) {
        std::fill(g, g + C, T(0));
        continue;
      }
      const double scale = static_cast<double>(grad[i * grad_stride]) / divisor;
      double mx, sum;
      row_stats(x + i * C, C, mx, sum);
      const double inv = scale / sum;
      const int64_t t_i = target[i];
      for (int64_t c = 0; c < C; ++c) {
        // The target's probability minus one stays in double until the end: rounding the probability to T
        // first would leave an error of eps(T) * scale where the result (near-certain rows) is far smaller.
        const double p = std::exp(static_cast<double>(x[i * C + c]) - mx) * inv;
        g[c] = static_cast<T>(c == t_i ? p - scale : p);
      }
    }
  });
}

template <class T>
void adam_step(int64_t n, T* param, const T* grad, T* exp_avg, T* exp_avg_sq, const AdamParams& p) {
  const double bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
  const double bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
  const AdamConsts<T> c{static_cast<T>(p.weight_decay), static_cast<T>(1.0 - p.beta1), static_cast<T>(p.beta2),
                        static_cast<T>(1.0 - p.beta2),  static_cast<T>(1.0 / std::sqrt(bc2)),
                        static_cast<T>(p.eps),          static_cast<T>(-p.lr / bc1)};
  const auto fn = train_ukernels().adam<T>();
  parallel_for(ceil_div(n, kChunk), threads_for_elements(4.0 * n), [&](int64_t t) {
    const int64_t b = t * kChunk;
    fn(std::min(kChunk, n - b), param + b, grad + b, exp_avg + b, exp_avg_sq + b, c);
  });
}

#define LK_INSTANTIATE(T)                                                                                     \
  template void linear_backward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, T*, T*, T*);     \
  template void max_pool2d_backward<T>(int64_t, int64_t, int64_t, const T*, const int64_t*, T*);             \
  template void relu_backward<T>(int64_t, const T*, const T*, T*);                                            \
  template int64_t cross_entropy_rows<T>(int64_t, int64_t, const T*, const int64_t*, int64_t, double*);      \
  template void cross_entropy_backward<T>(int64_t, int64_t, const T*, int64_t, double, const T*,              \
                                          const int64_t*, int64_t, T*);                                       \
  template void adam_step<T>(int64_t, T*, const T*, T*, T*, const AdamParams&);
LK_INSTANTIATE(float)
LK_INSTANTIATE(double)
#undef LK_INSTANTIATE

}  // namespace lk::cpu
