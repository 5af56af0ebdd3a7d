#include "cpu/pool2d.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/thread_pool.h"

namespace lk::cpu {

void validate(const Pool2dDesc& d) {
  LK_CHECK(d.N >= 0 && d.C > 0 && d.H > 0 && d.W > 0, "input: expected non-zero size for non-batch dimensions");
  LK_CHECK(d.kh > 0 && d.kw > 0, "kernel_size: must be positive");
  LK_CHECK(d.stride_h > 0 && d.stride_w > 0, "stride: must be positive");
  LK_CHECK(d.dil_h > 0 && d.dil_w > 0, "dilation: must be positive");
  LK_CHECK(d.pad_h >= 0 && d.pad_w >= 0 && d.pad_h <= d.kh / 2 && d.pad_w <= d.kw / 2,
           "padding: must be non-negative and at most half of kernel_size");
  LK_CHECK(d.H + 2 * d.pad_h >= d.dil_h * (d.kh - 1) + 1 && d.W + 2 * d.pad_w >= d.dil_w * (d.kw - 1) + 1 &&
               d.P() >= 1 && d.Q() >= 1,
           "input: output size is too small for this kernel_size, padding and dilation");
}

template <class T>
void max_pool_rows(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                   T* out, int64_t* idx) {
  const int64_t Q = d.Q(), H = d.H, W = d.W;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t h0 = p * d.stride_h - d.pad_h;
    const int64_t h_end = std::min(h0 + (d.kh - 1) * d.dil_h + 1, H);
    while (h0 < 0) h0 += d.dil_h;
    for (int64_t q = 0; q < Q; ++q) {
      int64_t w0 = q * d.stride_w - d.pad_w;
      const int64_t w_end = std::min(w0 + (d.kw - 1) * d.dil_w + 1, W);
      while (w0 < 0) w0 += d.dil_w;
      // torch's rule: the first maximum wins, a NaN replaces anything.
      T best = -std::numeric_limits<T>::infinity();
      int64_t best_i = h0 * W + w0;
      for (int64_t ih = h0; ih < h_end; ih += d.dil_h) {
        const T* row = x + (ih - r0) * sh;
        for (int64_t iw = w0; iw < w_end; iw += d.dil_w) {
          const T v = row[iw * sw];
          if (v > best || std::isnan(v)) {
            best = v;
            best_i = ih * W + iw;
          }
        }
      }
      out[(p - p0) * Q + q] = best;
      if (idx) idx[(p - p0) * Q + q] = best_i;
    }
  }
}

template <class T>
void max_pool2d(const Pool2dDesc& d, const TensorView& x, T* y, int64_t* indices) {
  const int64_t P = d.P(), Q = d.Q(), C = d.C;
  const int64_t planes = d.N * C;
  if (planes == 0) return;
  const double work = static_cast<double>(planes) * P * Q * d.kh * d.kw;
  const int threads = static_cast<int>(std::clamp(work / 2e6, 1.0, static_cast<double>(get_num_threads())));
  // Plane batches big enough to amortise a task, small enough to balance.
  const int64_t per_task = std::max<int64_t>(1, planes / (8 * threads));
  const int64_t tasks = (planes + per_task - 1) / per_task;

  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t begin = task * per_task, end = std::min(planes, begin + per_task);
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* xc = x.ptr<T>() + (plane / C) * x.strides[0] + (plane % C) * x.strides[1];
      max_pool_rows(d, xc, 0, x.strides[2], x.strides[3], 0, P, y + plane * P * Q,
                    indices ? indices + plane * P * Q : nullptr);
    }
  });
}

template void max_pool_rows<float>(const Pool2dDesc&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   float*, int64_t*);
template void max_pool_rows<double>(const Pool2dDesc&, const double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                    double*, int64_t*);
template void max_pool2d<float>(const Pool2dDesc&, const TensorView&, float*, int64_t*);
template void max_pool2d<double>(const Pool2dDesc&, const TensorView&, double*, int64_t*);

}  // namespace lk::cpu
