#include "cpu/pool2d.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <utility>

#include "core/error.h"
#include "core/memory.h"
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
  LK_CHECK(d.P() >= 1 && d.Q() >= 1, "input: output size is too small for this kernel_size, padding and dilation");
}

namespace {

// T's bits as a signed integer ordered like T's values, -0 equal to +0 and
// NaN above everything, so that torch's rule takes integer compares and
// masks, where a branch per tap mispredicts often on real data. A NaN tap
// compares as kMag and is kept as kMag - 1: any later NaN replaces it,
// nothing else does.
template <class T>
struct OrderedKey {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr I kMag = std::numeric_limits<I>::max();
  static constexpr I kInf = std::bit_cast<I>(std::numeric_limits<T>::infinity());

  I compare, keep;
  explicit OrderedKey(I bits) {
    const I mag = bits & kMag;
    const I sign = bits >> (8 * sizeof(I) - 1);  // 0 or -1
    const bool nan = mag > kInf;
    compare = nan ? kMag : (mag ^ sign) - sign;
    keep = compare - nan;
  }
};

// Windows [q0, q1) of output rows [p0, p1) one tap at a time, clipped to the
// input: what no microkernel covers (column strides other than 1 that are
// not gathered, stride_w over 2) and windows wholly in the padding. out and
// idx point at output row p0, rows ldo apart.
template <class T>
void max_pool_scalar(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                     int64_t q0, int64_t q1, T* out, int64_t* idx, int64_t ldo) {
  using Key = OrderedKey<T>;
  using I = typename Key::I;
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
      I best = std::bit_cast<I>(-std::numeric_limits<T>::infinity());
      I best_key = Key(best).keep;
      int64_t best_i = h0 * W + w0;
      for (int64_t ih = h0; ih < h_end; ih += d.dil_h) {
        const T* row = x + (ih - r0) * sh;
        for (int64_t iw = w0; iw < w_end; iw += d.dil_w) {
          const I v = std::bit_cast<I>(row[iw * sw]);
          const Key key(v);
          // best_key only grows: a maximum keeps the chain from tap to tap
          // short. Masks, since the compiler turns ?: back into a branch.
          const I take = -static_cast<I>(key.compare > best_key);
          best_key = std::max(best_key, key.keep);
          best = (v & take) | (best & ~take);
          best_i = ((ih * W + iw) & int64_t{take}) | (best_i & ~int64_t{take});
        }
      }
      out[(p - p0) * ldo + q] = std::bit_cast<T>(best);
      if (idx) idx[(p - p0) * ldo + q] = best_i;
    }
  }
}

// The microkernel for windows of kh rows (after clipping) whose columns lie
// wholly inside the input, or null.
template <class T>
const MaxPoolUkernel<T>* pick_ukernel(const Pool2dDesc& d, int64_t kh, int64_t sw) {
  if (sw != 1) return nullptr;
  // Tap offsets within a window must fit the kernels' lane integers.
  const int64_t span = (kh - 1) * d.dil_h * d.W + (d.kw - 1) * d.dil_w;
  if (sizeof(T) == 4 && span > INT32_MAX) return nullptr;
  const MaxPoolUkernels<T>& k = ukernels().maxpool<T>();
  if (d.stride_w == 2 && kh == 2 && d.kw == 2 && d.dil_h == 1 && d.dil_w == 1) return &k.k2x2s2;
  if (d.stride_w == 1) return &k.s1;
  if (d.stride_w == 2) return &k.s2;
  return nullptr;
}

// Output positions along one axis whose windows lie wholly inside the input:
// [first, end), with end >= first.
std::pair<int64_t, int64_t> interior(int64_t size, int64_t pad, int64_t s, int64_t span, int64_t out) {
  const int64_t first = std::min((pad + s - 1) / s, out);
  const int64_t room = size - span + pad;
  const int64_t end = room < 0 ? 0 : std::min(room / s + 1, out);
  return {first, std::max(first, end)};
}

// max_pool_rows (pool2d.h), prefetching when the input streams from memory.
template <class T>
void pool_rows(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1, T* out,
               int64_t* idx, bool prefetch) {
  const int64_t Q = d.Q();
  const auto [qa, qb] = interior(d.W, d.pad_w, d.stride_w, (d.kw - 1) * d.dil_w + 1, Q);
  auto scalar = [&](int64_t pb_, int64_t pe_, int64_t qb_, int64_t qe_) {
    if (pb_ < pe_ && qb_ < qe_)
      max_pool_scalar(d, x, r0, sh, sw, pb_, pe_, qb_, qe_, out + (pb_ - p0) * Q, idx ? idx + (pb_ - p0) * Q : nullptr,
                      Q);
  };
  // Output rows [pb_, pe_) whose windows keep kh_ rows after clipping, the
  // first at input row h0. Clipping is the same along a row (the top and
  // bottom rows of padding) and down a column (the sides): a microkernel
  // takes the columns that need none, and each side column is a block of
  // its own with windows of fewer columns, one window per row, run after the
  // interior has brought the rows into cache.
  auto rows = [&](int64_t pb_, int64_t pe_, int64_t h0, int64_t kh_) {
    const MaxPoolUkernel<T>* k = kh_ > 0 ? pick_ukernel<T>(d, kh_, sw) : nullptr;
    if (k == nullptr) return scalar(pb_, pe_, 0, Q);
    MaxPoolBlock<T> b;
    b.x_row = sh;
    b.x_step = d.stride_h * sh;
    b.W = d.W;
    b.idx_step = d.stride_h * d.W;
    b.kh = kh_, b.dil_h = d.dil_h, b.dil_w = d.dil_w;
    b.m = pe_ - pb_;
    b.y_row = Q;
    b.prefetch = prefetch;
    auto run = [&](const MaxPoolUkernel<T>& kernel, int64_t q0, int64_t n, int64_t w0, int64_t kw_) {
      b.x = x + (h0 - r0) * sh + w0;
      b.idx0 = h0 * d.W + w0;
      b.kw = kw_;
      b.n = n;
      b.y = out + (pb_ - p0) * Q + q0;
      b.idx = idx ? idx + (pb_ - p0) * Q + q0 : nullptr;
      kernel.fn(b);
    };
    // The s2 kernel takes a 3x3 pool's left column under padding 1 along
    // with the interior (its rows' maxima shared as the interior's are).
    const bool left = !idx && k == &ukernels().maxpool<T>().s2 && qa == 1 && qa < qb && d.kw == 3 &&
                      d.dil_w == 1 && d.pad_w == 1;
    b.left = left;
    if (qa < qb) run(*k, qa, qb - qa, qa * d.stride_w - d.pad_w, d.kw);
    b.left = false;
    const MaxPoolUkernel<T>& any = ukernels().maxpool<T>().s1;  // one window per row: any stride
    auto side = [&](int64_t q) {
      int64_t w0 = q * d.stride_w - d.pad_w;
      const int64_t w_end = std::min(w0 + (d.kw - 1) * d.dil_w + 1, d.W);
      while (w0 < 0) w0 += d.dil_w;
      if (w_end > w0) run(any, q, 1, w0, (w_end - w0 + d.dil_w - 1) / d.dil_w);
      else scalar(pb_, pe_, q, q + 1);  // wholly in the padding
    };
    for (int64_t q = left ? 1 : 0; q < qa; ++q) side(q);
    for (int64_t q = qb; q < Q; ++q) side(q);
  };
  auto clipped_row = [&](int64_t p) {
    int64_t h0 = p * d.stride_h - d.pad_h;
    const int64_t h_end = std::min(h0 + (d.kh - 1) * d.dil_h + 1, d.H);
    while (h0 < 0) h0 += d.dil_h;
    rows(p, p + 1, h0, h_end > h0 ? (h_end - h0 + d.dil_h - 1) / d.dil_h : 0);
  };

  auto [pa, pb] = interior(d.H, d.pad_h, d.stride_h, (d.kh - 1) * d.dil_h + 1, d.P());
  pa = std::clamp(pa, p0, p1);
  pb = std::clamp(pb, pa, p1);
  for (int64_t p = p0; p < pa; ++p) clipped_row(p);
  if (pa < pb) rows(pa, pb, pa * d.stride_h - d.pad_h, d.kh);
  for (int64_t p = pb; p < p1; ++p) clipped_row(p);
}

}  // namespace

template <class T>
void max_pool_rows(const Pool2dDesc& d, const T* x, int64_t r0, int64_t sh, int64_t sw, int64_t p0, int64_t p1,
                   T* out, int64_t* idx) {
  pool_rows(d, x, r0, sh, sw, p0, p1, out, idx, false);
}

template <class T>
void max_pool2d(const Pool2dDesc& d, const TensorView& x, T* y, int64_t* indices) {
  const int64_t N = d.N, C = d.C, W = d.W, P = d.P(), Q = d.Q();
  if (N == 0) return;
  const int64_t sc = x.strides[1], sh = x.strides[2], sw = x.strides[3];
  // Values only, planes one after another whose windows tile them exactly
  // (no padding above or below, P * stride_h == H, windows no taller than
  // the stride, so none spans two planes): one tall plane, no call per plane,
  // rows split as the threads need (64 x 64 planes of 16x16: 132 -> 57 us
  // on 2 threads).
  if (!indices && N * C > 1 && d.pad_h == 0 && P * d.stride_h == d.H && (d.kh - 1) * d.dil_h < d.stride_h &&
      sc == d.H * sh && (N == 1 || x.strides[0] == C * sc)) {
    Pool2dDesc tall = d;
    tall.N = 1, tall.C = 1, tall.H = N * C * d.H;
    TensorView v = x;
    v.shape[0] = 1, v.shape[1] = 1, v.shape[2] = tall.H;
    v.strides[0] = v.strides[1] = tall.H * sh;
    return max_pool2d(tall, v, y, nullptr);
  }
  // Rows with a column stride are gathered into a contiguous band first when
  // that lets a microkernel run: one strided load per input element instead
  // of a scalar step per window tap. Channels that share cache lines (a
  // channels-last array) are gathered together, so that each line is read
  // once rather than once per channel.
  const bool vector = pick_ukernel<T>(d, d.kh, 1) != nullptr;
  const bool gather = sw != 1 && vector;
  const int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t group = gather && sc != 0 && std::abs(sc) < line ? std::min(C, line / std::abs(sc)) : 1;
  const int64_t groups_per_image = (C + group - 1) / group, groups = N * groups_per_image;

  // Time on one thread, in ns, measured on the development machine: window
  // taps at the rate of the microkernels (or of the scalar code), or the
  // memory traffic at about 40 GB/s (inputs fresh from a previous layer sit
  // in cache), whichever is more, plus the gathering. A second thread pays
  // off from about 10 us: in a stream of calls the workers are awake (a
  // hand-off of under a microsecond), and one that has to be woken only
  // joins late; the tasks are small enough that the caller takes its share.
  const double planes = static_cast<double>(N) * C;
  const double in = planes * d.H * W, taps = planes * P * Q * d.kh * d.kw;
  const double bytes = in * sizeof(T) + planes * P * Q * (sizeof(T) + (indices ? 8 : 0));
  const double ns = std::max(taps * (vector ? 0.1 : 2.5), bytes * 0.025) + (gather ? in * 0.3 : 0.0);
  const int threads = static_cast<int>(std::clamp(ns / 10e3, 1.0, static_cast<double>(get_num_threads())));
  // An input beyond L2 and most of L3 comes from memory (a gathered band is
  // in L2 by construction).
  const bool stream = in * sizeof(T) > (4 << 20);

  // Units of work are blocks of rows of a group of planes: whole planes when
  // there are enough to balance the threads, and gathered bands that stay
  // in L2.
  int64_t rows = P;
  if (groups < 4 * threads) {
    const int64_t split = (4 * threads + groups - 1) / groups;
    rows = (P + split - 1) / split;
  }
  if (gather)
    rows = std::clamp<int64_t>((256 << 10) / (static_cast<int64_t>(sizeof(T)) * group * d.stride_h * W), 1, rows);
  const int64_t blocks = (P + rows - 1) / rows, units = groups * blocks;
  const int64_t per_task = std::max<int64_t>(1, units / (8 * threads));

  parallel_for((units + per_task - 1) / per_task, threads, [&](int64_t task) {
    const int64_t end = std::min(units, (task + 1) * per_task);
    for (int64_t u = task * per_task; u < end; ++u) {
      const int64_t n = u / blocks / groups_per_image, c0 = u / blocks % groups_per_image * group;
      const int64_t c1 = std::min(C, c0 + group), p0 = u % blocks * rows, p1 = std::min(P, p0 + rows);
      const T* xn = x.ptr<T>() + n * x.strides[0];
      auto out = [&](int64_t c) { return ((n * C + c) * P + p0) * Q; };
      if (!gather) {
        for (int64_t c = c0; c < c1; ++c)
          pool_rows(d, xn + c * sc, 0, sh, sw, p0, p1, y + out(c), indices ? indices + out(c) : nullptr, stream);
        continue;
      }
      // The input rows the windows of rows [p0, p1) touch.
      const int64_t r0 = std::max<int64_t>(0, p0 * d.stride_h - d.pad_h);
      const int64_t r1 = std::min(d.H, (p1 - 1) * d.stride_h - d.pad_h + (d.kh - 1) * d.dil_h + 1);
      const int64_t plane = std::max<int64_t>(0, r1 - r0) * W;
      T* band = scratch_array<T>(kPoolBandSlot, static_cast<size_t>((c1 - c0) * plane));
      for (int64_t r = r0; r < r1; ++r) {
        const T* src = xn + c0 * sc + r * sh;
        T* dst = band + (r - r0) * W;
        if (c1 - c0 == 1) {
          for (int64_t w = 0; w < W; ++w) dst[w] = src[w * sw];
        } else {
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = 0; c < c1 - c0; ++c) dst[c * plane + w] = src[w * sw + c * sc];
        }
      }
      for (int64_t c = c0; c < c1; ++c)
        max_pool_rows(d, band + (c - c0) * plane, r0, W, int64_t{1}, p0, p1, y + out(c),
                      indices ? indices + out(c) : nullptr);
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
