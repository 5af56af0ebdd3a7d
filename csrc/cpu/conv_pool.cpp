#include "cpu/conv_pool.h"

#include <algorithm>

#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "cpu/pool2d.h"

namespace lk::cpu {

namespace {
Pool2dDesc pool_over(const Conv2dDesc& conv, Pool2dDesc pool) {
  pool.dtype = conv.dtype;
  pool.N = conv.N, pool.C = conv.K, pool.H = conv.P(), pool.W = conv.Q();
  return pool;
}
}  // namespace

template <class T>
Conv2dMaxPool2dPlan<T>::Conv2dMaxPool2dPlan(const Conv2dDesc& conv, const Pool2dDesc& pool, bool prepacked,
                                            ConvRestrict only)
    : conv_(conv, prepacked, nullptr, only), pool_(pool_over(conv, pool)) {
  if (conv.K > 0) validate(pool_);
  threads_ = conv_.threads();
  // Pooled rows per task: the band of convolution rows they need (about
  // stride_h rows each) should fit a quarter of L2 beside the packing
  // buffer, and there should be enough tasks for every thread.
  const int64_t band_row_bytes = std::max<int64_t>(1, conv.K * pool_.stride_h * pool_.W * int64_t(sizeof(T)));
  const int64_t P = pool_.P();
  rows_per_task_ = std::clamp<int64_t>(256 * 1024 / band_row_bytes, 1, std::max<int64_t>(P, 1));
  const int64_t want = 4 * static_cast<int64_t>(threads_);
  const int64_t per_image = ceil_div(want, std::max<int64_t>(conv.N, 1));
  rows_per_task_ = std::min(rows_per_task_, std::max<int64_t>(1, ceil_div(P, per_image)));
  // Then the band whose tasks share out most evenly: the busiest thread's
  // rows, ceil(tasks / threads) bands of rows_per_task, as few as any (7 bands
  // of 4 rows on 2 threads leave one thread a whole band idle; 14 of 2 none).
  const auto busiest = [&](int64_t rows) {
    return ceil_div(std::max<int64_t>(conv.N, 1) * ceil_div(P, rows), threads_) * rows;
  };
  int64_t best = rows_per_task_;
  for (int64_t rows = rows_per_task_ - 1; rows >= 1 && rows * 2 >= rows_per_task_; --rows)
    if (busiest(rows) < busiest(best)) best = rows;
  rows_per_task_ = best;
}

template <class T>
void Conv2dMaxPool2dPlan<T>::run(const TensorView& x, const typename Conv2dPlan<T>::Weights& wt, T* y,
                                 int64_t* indices) const {
  const Conv2dDesc& d = conv_.desc();
  conv_.check_input(x);
  if (d.N == 0 || d.K == 0) return;
  const int64_t K = d.K, CP = pool_.H, CQ = pool_.W, P = pool_.P(), Q = pool_.Q();
  const int64_t blocks = ceil_div(P, rows_per_task_);

  parallel_for(d.N * blocks, threads_, [&](int64_t task) {
    const int64_t n = task / blocks, p0 = (task % blocks) * rows_per_task_, p1 = std::min(P, p0 + rows_per_task_);
    // Convolution rows the pooling windows of rows [p0, p1) touch.
    const int64_t r0 = std::max<int64_t>(0, p0 * pool_.stride_h - pool_.pad_h);
    const int64_t r1 = std::min(CP, (p1 - 1) * pool_.stride_h - pool_.pad_h + (pool_.kh - 1) * pool_.dil_h + 1);
    const int64_t band = std::max<int64_t>(0, r1 - r0) * CQ;
    T* buf = scratch_array<T>(kFusedBandSlot, static_cast<size_t>(K * band));
    conv_.run_rows(x, wt, n, r0, r1, buf, band);
    // The band starts at convolution row r0 and max_pool_rows numbers rows
    // from the plane's top: indices come out flattened over the whole plane.
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = ((n * K + k) * P + p0) * Q;
      max_pool_rows(pool_, buf + k * band, r0, CQ, int64_t{1}, p0, p1, y + at, indices ? indices + at : nullptr);
    }
  });
}

template <class T>
std::string Conv2dMaxPool2dPlan<T>::describe() const {
  return cat("fused[", conv_.describe(), " -> max_pool2d ", pool_.kh, "x", pool_.kw, " stride ", pool_.stride_h,
             "x", pool_.stride_w, "] pooled_rows_per_task=", rows_per_task_);
}

template class Conv2dMaxPool2dPlan<float>;
template class Conv2dMaxPool2dPlan<double>;

}  // namespace lk::cpu
