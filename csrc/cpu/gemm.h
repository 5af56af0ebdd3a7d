// The ISA-independent half of GEMM: packing into microkernel panels and the
// macro-kernel that walks a block of C tile by tile. Convolution (implicit
// GEMM) and linear both build on it; what differs between them is only who
// packs which operand, and when.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Packs the m x k matrix src(i, p) = src[i*rs + p*cs] into ceil(m/mr) panels
// of k x mr (k-major), rows past m zero. Panel stride: k * mr.
template <class T>
void pack_a_panels(const T* src, int64_t rs, int64_t cs, int64_t m, int64_t k, int mr, T* dst) {
  for (int64_t i0 = 0; i0 < m; i0 += mr) {
    const int64_t rows = std::min<int64_t>(mr, m - i0);
    for (int64_t p = 0; p < k; ++p) {
      T* d = dst + p * mr;
      const T* s = src + i0 * rs + p * cs;
      int64_t i = 0;
      for (; i < rows; ++i) d[i] = s[i * rs];
      for (; i < mr; ++i) d[i] = T(0);
    }
    dst += k * mr;
  }
}

// Packs the k x n matrix src(p, j) = src[p*rs + j*cs] into ceil(n/nr) panels
// of k x nr (k-major), columns past n zero. Panel stride: k * nr.
template <class T>
void pack_b_panels(const T* src, int64_t rs, int64_t cs, int64_t k, int64_t n, int nr, T* dst) {
  if (rs == 1 && cs != 1) {  // a transpose: read each source column (a row in memory) contiguously
    for (int64_t j0 = 0; j0 < n; j0 += nr, dst += k * nr) {
      const int64_t cols = std::min<int64_t>(nr, n - j0);
      for (int64_t j = 0; j < nr; ++j) {
        if (j < cols) {
          const T* s = src + (j0 + j) * cs;
          for (int64_t p = 0; p < k; ++p) dst[p * nr + j] = s[p];
        } else {
          for (int64_t p = 0; p < k; ++p) dst[p * nr + j] = T(0);
        }
      }
    }
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += nr) {
    const int64_t cols = std::min<int64_t>(nr, n - j0);
    for (int64_t p = 0; p < k; ++p) {
      T* d = dst + p * nr;
      const T* s = src + p * rs + j0 * cs;
      int64_t j = 0;
      if (cs == 1)
        for (; j < cols; ++j) d[j] = s[j];
      else
        for (; j < cols; ++j) d[j] = s[j * cs];
      for (; j < nr; ++j) d[j] = T(0);
    }
    dst += k * nr;
  }
}

// C[0:m, 0:n] (row stride ldc) op= A * B over one K block of length kc.
// A: packed panels a_panel_stride apart (lda == 0), or a row-major matrix
// with row stride lda used in place. B: ceil(n/NR) panels b_panel_stride
// apart. ep.bias points at the bias of row 0 / column 0.
// Each B micro-panel (kc x NR) is used for every MR rows of A while it is in
// L1; A streams from L2 (the blocking keeps kc x NR within L1).
template <class T>
void macro_kernel(const GemmUkernel<T>& uk, int64_t m, int64_t n, int64_t kc, const T* A, int64_t a_panel_stride,
                  int64_t lda, const T* B, int64_t b_panel_stride, T* C, int64_t ldc, const GemmEpilogue<T>& ep) {
  GemmEpilogue<T> e = ep;
  const GemmUkernelFn<T> fn = lda == 0 ? uk.packed : uk.rows;
  for (int64_t j = 0; j < n; j += uk.nr) {
    const int nr = static_cast<int>(std::min<int64_t>(uk.nr, n - j));
    const T* b = B + (j / uk.nr) * b_panel_stride;
    for (int64_t i = 0; i < m; i += uk.mr) {
      const int mr = static_cast<int>(std::min<int64_t>(uk.mr, m - i));
      const T* a = lda == 0 ? A + (i / uk.mr) * a_panel_stride : A + i * lda;
      if (ep.bias != nullptr) e.bias = ep.bias + (ep.bias_per_row ? i : j);
      fn(kc, a, lda, b, C + i * ldc + j, ldc, mr, nr, e);
    }
  }
}

// Copies an m x n tile (row stride ldt) transposed into C (C[j * ldc + i]):
// pixels x channels into channel planes, by the active level's kernel.
template <class T>
void store_transposed(const T* tile, int64_t ldt, int64_t m, int64_t n, T* C, int64_t ldc) {
  ukernels().transpose<T>().fn(tile, ldt, m, n, C, ldc);
}

}  // namespace lk::cpu
