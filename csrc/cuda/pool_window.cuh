// One max-pooling window, as torch visits it: shared by maxpool.cu (windows
// over global memory) and conv_pool.cu (windows over a tile in shared memory).
#pragma once
#include "core/descriptors.h"
#include "cuda/common.cuh"

namespace lk::cuda {

struct PoolShape {
  int H, W;  // input plane
  int P, Q;  // output plane
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

inline PoolShape pool_shape(const Pool2dDesc& d) {
  auto i = [](int64_t v) { return static_cast<int>(v); };
  return {i(d.H), i(d.W), i(d.P()), i(d.Q()), i(d.kh), i(d.kw), i(d.stride_h), i(d.stride_w),
          i(d.pad_h), i(d.pad_w), i(d.dil_h), i(d.dil_w)};
}

// The maximum of window (p, q) and its index ih * W + iw in the input plane.
// Taps are visited row by row; a tap replaces the best so far when it is
// greater or NaN, so the first of equal values and the last NaN win. The
// window starts at -inf with the index of its first tap inside the input,
// and taps in the padding are skipped, never candidates.
template <class T, class Read>
__device__ __forceinline__ T window_max(const PoolShape& s, int p, int q, Read read, int& index) {
  const int h0 = p * s.sh - s.ph, w0 = q * s.sw - s.pw;
  int first_h = h0, first_w = w0;
  while (first_h < 0) first_h += s.dh;
  while (first_w < 0) first_w += s.dw;
  T best = dev::neg_inf<T>();
  index = first_h * s.W + first_w;
  for (int i = 0; i < s.kh; ++i) {
    const int ih = h0 + i * s.dh;
    if (ih < 0 || ih >= s.H) continue;
    for (int j = 0; j < s.kw; ++j) {
      const int iw = w0 + j * s.dw;
      if (iw < 0 || iw >= s.W) continue;
      const T v = read(ih, iw);
      if (dev::takes_max(v, best)) {
        best = v;
        index = ih * s.W + iw;
      }
    }
  }
  return best;
}

}  // namespace lk::cuda
