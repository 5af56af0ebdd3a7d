#include "cpu/pool2d.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/ukernels/ukernels.h"

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

namespace {

// Windows [q0, q1) of output rows [p0, p1) one tap at a time, clipped to the
// input, for the windows that touch the padding and whatever no microkernel
// covers. out and idx point at output row p0, rows ldo apart.
template <class T>
void max_pool_scalar(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                     int64_t q0, int64_t q1, T* out, int64_t* idx, int64_t ldo) {
  const int64_t H = d.H, W = d.W;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t h0 = p * d.stride_h - d.pad_h;
    const int64_t h_end = std::min(h0 + (d.kh - 1) * d.dil_h + 1, H);
    while (h0 < 0) h0 += d.dil_h;
    for (int64_t q = q0; q < q1; ++q) {
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
      out[(p - p0) * ldo + q] = best;
      if (idx) idx[(p - p0) * ldo + q] = best_i;
    }
  }
}

// The microkernel for windows wholly inside the input, or null.
template <class T>
const MaxPoolUkernel<T>* interior_ukernel(const Pool2dDesc& d, int64_t sw) {
  if (sw != 1) return nullptr;
  // Tap offsets within a window must fit the kernels' lane integers.
  const int64_t span = (d.kh - 1) * d.dil_h * d.W + (d.kw - 1) * d.dil_w;
  if (sizeof(T) == 4 && span > INT32_MAX) return nullptr;
  const MaxPoolUkernels<T>& k = ukernels().maxpool<T>();
  if (d.stride_w == 2 && d.kh == 2 && d.kw == 2 && d.dil_h == 1 && d.dil_w == 1) return &k.k2x2s2;
  if (d.stride_w == 1) return &k.s1;
  if (d.stride_w == 2) return &k.s2;
  return nullptr;
}

// First i >= 0 with i * s - pad >= 0, and one past the last with
// i * s - pad + span <= size (at least the first).
std::pair<int64_t, int64_t> interior(int64_t size, int64_t pad, int64_t s, int64_t span, int64_t out) {
  const int64_t first = std::min((pad + s - 1) / s, out);
  const int64_t room = size - span + pad;
  const int64_t end = room < 0 ? 0 : std::min(room / s + 1, out);
  return {first, std::max(first, end)};
}

}  // namespace

template <class T>
void max_pool_rows(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                   T* out, int64_t* idx) {
  const int64_t Q = d.Q();
  auto scalar = [&](int64_t pb_, int64_t pe_, int64_t qb_, int64_t qe_) {
    if (pb_ < pe_ && qb_ < qe_)
      max_pool_scalar(d, x, r0, sh, sw, pb_, pe_, qb_, qe_, out + (pb_ - p0) * Q, idx ? idx + (pb_ - p0) * Q : nullptr,
                      Q);
  };
  const MaxPoolUkernel<T>* k = interior_ukernel<T>(d, sw);
  auto [pa, pb] = interior(d.H, d.pad_h, d.stride_h, (d.kh - 1) * d.dil_h + 1, d.P());
  const auto [qa, qb] = interior(d.W, d.pad_w, d.stride_w, (d.kw - 1) * d.dil_w + 1, Q);
  pa = std::clamp(pa, p0, p1);
  pb = std::clamp(pb, pa, p1);
  if (k == nullptr || pa == pb || qa == qb) {
    scalar(p0, p1, 0, Q);
    return;
  }
  scalar(p0, pa, 0, Q);
  scalar(pa, pb, 0, qa);
  const int64_t h0 = pa * d.stride_h - d.pad_h, w0 = qa * d.stride_w - d.pad_w;
  MaxPoolBlock<T> b;
  b.x = x + (h0 - r0) * sh + w0;
  b.x_row = sh;
  b.x_step = d.stride_h * sh;
  b.W = d.W;
  b.idx0 = h0 * d.W + w0;
  b.idx_step = d.stride_h * d.W;
  b.kh = d.kh, b.kw = d.kw, b.dil_h = d.dil_h, b.dil_w = d.dil_w;
  b.m = pb - pa, b.n = qb - qa;
  b.y = out + (pa - p0) * Q + qa;
  b.idx = idx ? idx + (pa - p0) * Q + qa : nullptr;
  b.y_row = Q;
  k->fn(b);
  scalar(pa, pb, qb, Q);
  scalar(pb, p1, 0, Q);
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
