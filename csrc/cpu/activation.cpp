#include "cpu/activation.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace lk::cpu {

namespace {
int threads_for_elements(double n) {
  return static_cast<int>(std::clamp(n / 256e3, 1.0, static_cast<double>(get_num_threads())));
}
}  // namespace

template <class T>
void relu(const T* x, T* y, int64_t n) {
  constexpr int64_t chunk = 64 * 1024;
  parallel_for(ceil_div(n, chunk), threads_for_elements(static_cast<double>(n)), [&](int64_t t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    for (int64_t i = b; i < e; ++i) y[i] = x[i] < T(0) ? T(0) : x[i];
  });
}

template <class T>
void softmax(const T* x, T* y, int64_t outer, int64_t dim, int64_t inner, bool log) {
  if (outer == 0 || dim == 0 || inner == 0) return;
  // One task per (outer, block of inner) so the walk along `dim` stays
  // strided by `inner` but each task touches whole cache lines.
  const int64_t iblock = std::min<int64_t>(inner, 256);
  const int64_t iblocks = ceil_div(inner, iblock);
  const double work = 4.0 * outer * dim * inner;
  parallel_for(outer * iblocks, threads_for_elements(work), [&](int64_t t) {
    const int64_t o = t / iblocks, i0 = (t % iblocks) * iblock, i1 = std::min(inner, i0 + iblock);
    const T* xs = x + o * dim * inner;
    T* ys = y + o * dim * inner;
    for (int64_t i = i0; i < i1; ++i) {
      T mx = -std::numeric_limits<T>::infinity();
      bool nan = false;
      for (int64_t k = 0; k < dim; ++k) {
        const T v = xs[k * inner + i];
        nan |= std::isnan(v);
        mx = v > mx ? v : mx;
      }
      if (nan) {
        for (int64_t k = 0; k < dim; ++k) ys[k * inner + i] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      // A row of -inf has no finite maximum; torch gives NaN there too.
      // Short rows (a classifier's) keep their exponentials for the output:
      // one exp per element instead of two.
      constexpr int64_t kKept = 64;
      double kept[kKept];
      double sum = 0.0;
      for (int64_t k = 0; k < dim; ++k) {
        const double e = std::exp(static_cast<double>(xs[k * inner + i] - mx));
        if (k < kKept) kept[k] = e;
        sum += e;
      }
      if (log) {
        const double lse = std::log(sum);
        for (int64_t k = 0; k < dim; ++k)
          ys[k * inner + i] = static_cast<T>(static_cast<double>(xs[k * inner + i] - mx) - lse);
      } else {
        const double inv = 1.0 / sum;
        for (int64_t k = 0; k < dim; ++k) {
          const double e = k < kKept ? kept[k] : std::exp(static_cast<double>(xs[k * inner + i] - mx));
          ys[k * inner + i] = static_cast<T>(e * inv);
        }
      }
    }
  });
}

template void relu<float>(const float*, float*, int64_t);
template void relu<double>(const double*, double*, int64_t);
template void softmax<float>(const float*, float*, int64_t, int64_t, int64_t, bool);
template void softmax<double>(const double*, double*, int64_t, int64_t, int64_t, bool);

}  // namespace lk::cpu
