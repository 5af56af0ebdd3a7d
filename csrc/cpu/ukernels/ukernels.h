// The microkernel table: one per instruction-set level, each filled in a
// translation unit compiled with that level's flags. Everything above the
// microkernels (packing, blocking, threading) is ISA-independent and asks the
// table of the active level for its kernels and their tile sizes.
#pragma once
#include <cstdint>

#include "core/cpu_features.h"

namespace lk::cpu {

// What a GEMM microkernel does around its MR x NR tile of C = A * B.
template <class T>
struct GemmEpilogue {
  const T* bias = nullptr;    // first entry for this tile, or none
  bool bias_per_row = true;   // per row of C (conv channels) or per column (linear)
  bool accumulate = false;    // add to C instead of overwriting it (later K blocks)
  bool relu = false;          // applied after the last K block
};

// C[0:mr, 0:nr] (row stride ldc) = A * B with the epilogue, over kc steps.
// B: kc x NR, packed k-major. A: kc x MR packed k-major (`packed`, lda
// ignored), or rows of a row-major matrix with row stride lda (`rows`).
// mr <= MR and nr <= NR; only the valid mr x nr part of C is read or written
// and only mr rows of a row-major A are read. A per-column bias must be
// readable for a whole NR; a per-row bias is read for the mr valid rows only.
template <class T>
using GemmUkernelFn = void (*)(int64_t kc, const T* A, int64_t lda, const T* B, T* C, int64_t ldc, int mr, int nr,
                               const GemmEpilogue<T>& ep);

// The same product with A read through an indirection: A(i, k) =
// a_rows[i][k_off[k]], where a_rows holds mr row pointers (convolution: one
// per output pixel, into the input) and k_off kc offsets (one per filter tap
// and channel). Nothing is packed: the input is read where it lies.
template <class T>
using GemmIndirectFn = void (*)(int64_t kc, const T* const* a_rows, const int64_t* k_off, const T* B, T* C,
                                int64_t ldc, int mr, int nr, const GemmEpilogue<T>& ep);

template <class T>
struct GemmUkernel {
  int mr;
  int nr;
  GemmUkernelFn<T> packed;
  GemmUkernelFn<T> rows;
  GemmIndirectFn<T> indirect;
  const char* name;
};

// y[r][0:n] = act(bias + W x[r]) for rows <= 4 input rows x (row stride
// ldx) of length k and n rows of W (row stride ldw), all contiguous along k;
// y rows ldy apart; bias may be null.
template <class T>
using DotUkernelFn = void (*)(int64_t k, const T* x, int64_t ldx, int rows, const T* w, int64_t ldw, int64_t n, T* y,
                              int64_t ldy, const T* bias, bool relu);

// y[r][0:n] = act(bias + W x[r]) for a few input rows x (row stride ldx,
// y's ldy) of length k against W packed in panels (pack_b_panels: k x nr
// each, nr = gemv_nr, zero-padded past n); bias null or zero-padded like the
// panels. Backward reads the weights in the opposite order, for the same
// result.
template <class T>
using GemvUkernelFn = void (*)(int64_t k, const T* x, int64_t ldx, int rows, const T* panels, int64_t n, T* y,
                               int64_t ldy, const T* bias, bool relu, bool backward);

// The dot kernel, and beside it the few-row kernel over packed panels:
// contiguous streams of weights where the dot kernel reads many rows.
template <class T>
struct DotUkernel {
  DotUkernelFn<T> fn;
  const char* name;
  GemvUkernelFn<T> gemv;
  int gemv_nr;
  const char* gemv_name;
};

// A block of m x n max-pooling windows of kh x kw taps (dil_h, dil_w apart)
// that lie wholly inside the input, whose rows are contiguous. Window (r, c)
// starts at x + r * x_step + c * stride_w, stride_w being the kernel's; its
// first tap has the flat index idx0 + r * idx_step + c * stride_w and a tap
// dil_h rows lower is W further. Outputs go to y[r * y_row + c], indices (if
// idx is not null) to idx[r * y_row + c]. A window's largest tap offset,
// (kh - 1) * dil_h * W + (kw - 1) * dil_w, must fit in an integer as wide as T.
template <class T>
struct MaxPoolBlock {
  const T* x;
  int64_t x_row;   // elements between input rows
  int64_t x_step;  // elements between the windows of consecutive output rows
  int64_t W;
  int64_t idx0, idx_step;
  int64_t kh, kw, dil_h, dil_w;
  int64_t m, n;
  T* y;
  int64_t* idx;
  int64_t y_row;
  bool prefetch;  // the input streams from memory: fetch ahead of the hardware prefetcher
  // Values only, 3x3 windows at stride_w 2 (the s2 kernel): also the window
  // one output column left of the block, clipped to the two input columns
  // before x's first (a plane's left column under padding 1), into y[-1].
  bool left = false;
};

template <class T>
using MaxPoolUkernelFn = void (*)(const MaxPoolBlock<T>& b);

template <class T>
struct MaxPoolUkernel {
  MaxPoolUkernelFn<T> fn;
  const char* name;
};

template <class T>
struct MaxPoolUkernels {
  MaxPoolUkernel<T> k2x2s2;  // 2 x 2 windows, no dilation, stride_w 2
  MaxPoolUkernel<T> s1;      // any window, stride_w 1
  MaxPoolUkernel<T> s2;      // any window, stride_w 2
};

// dst[j * ldd + i] = src[i * lds + j] for i < m, j < n (src and dst apart).
template <class T>
using TransposeUkernelFn = void (*)(const T* src, int64_t lds, int64_t m, int64_t n, T* dst, int64_t ldd);

template <class T>
struct TransposeUkernel {
  TransposeUkernelFn<T> fn;
  const char* name;
};

// Output channels k0..k1 of one image, rows r0..r1, of a convolution with
// few channels per group (depthwise: one), each computed directly: the input
// rows each channel reads are copied with their zero padding into `band`
// (all of them, or only the R rows of one output row when strides or
// dilations skip most rows), and every tap of a vector of outputs is summed
// in registers. Channel k reads input channels (k / Kg) * Cg .. + Cg.
template <class T>
struct DwconvJob {
  const T* x;                  // the image's first channel
  int64_t x_c, x_h, x_w;       // strides of x in elements
  int64_t H, W, pad_top, pad_left;
  int64_t R, S, stride_h, stride_w, dil_h, dil_w;
  int64_t Cg, Kg;
  int64_t k0, k1, r0, r1, Q;
  const T* w;                  // (K, Cg, R, S)
  const T* bias;               // K entries, or null
  bool relu;
  T* y;                        // channel k0's row r0
  int64_t y_k;                 // elements between output channels (rows are Q apart)
  T* band;                     // (per_row ? R : band_rows) rows of `width`
  int64_t width, band_rows;
  bool per_row;
  // One filter per channel, planes narrower than a vector (a row's lanes
  // mostly idle): channels in the lanes instead, a block of them at a time,
  // the band (band_rows x width pixels) and then the outputs held as pixels x
  // channels, transposed in registers. The band then needs (band_rows *
  // width + max(band_rows * W, (r1 - r0) * Q)) * lanes elements; per_row is off.
  bool hwc = false;
};

// The band's rows must hold every tap of every column and the lanes past Q
// that the last vector reads: (round_up(Q, lanes) - 1) * stride_w +
// (S - 1) * dil_w + stride_w elements at least, and pad_left + W.
constexpr int64_t kDwconvHwcMaxTaps = 25;  // DwconvJob::hwc: the window's weight vectors in registers

template <class T>
using DwconvFn = void (*)(const DwconvJob<T>& job);

template <class T>
struct DwconvUkernel {
  DwconvFn<T> fn;
  int lanes;
  const char* name;
};

// `iters` rounds of `lanes` independent float multiply-adds in registers
// (2 * lanes flops a round): the FMA ceiling the benchmarks report against.
struct FmaPeakUkernel {
  float (*fn)(int64_t iters);
  int lanes;
  const char* name;
};

// Per level: a wide tile (more columns), a tall one (more rows) and a narrow
// one (the wide tile's rows, the tall tile's columns: no padding where the
// rows come in eights and the columns in the tall tile's width, such as the
// last 32 columns of a 128-wide linear layer).
constexpr int kGemmShapes = 3;

struct UkernelTable {
  Isa isa;
  GemmUkernel<float> f32_gemm[kGemmShapes];
  GemmUkernel<double> f64_gemm[kGemmShapes];
  DotUkernel<float> f32_dot;
  DotUkernel<double> f64_dot;
  MaxPoolUkernels<float> f32_maxpool;
  MaxPoolUkernels<double> f64_maxpool;
  TransposeUkernel<float> f32_transpose;
  TransposeUkernel<double> f64_transpose;
  DwconvUkernel<float> f32_dwconv;
  DwconvUkernel<double> f64_dwconv;
  FmaPeakUkernel f32_fma_peak;

  template <class T> const GemmUkernel<T>& gemm(int shape = 0) const;
  template <class T> const DotUkernel<T>& dot() const;
  template <class T> const MaxPoolUkernels<T>& maxpool() const;
  template <class T> const TransposeUkernel<T>& transpose() const;
  template <class T> const DwconvUkernel<T>& dwconv() const;
};

template <> inline const GemmUkernel<float>& UkernelTable::gemm<float>(int shape) const { return f32_gemm[shape]; }
template <> inline const GemmUkernel<double>& UkernelTable::gemm<double>(int shape) const { return f64_gemm[shape]; }
template <> inline const DotUkernel<float>& UkernelTable::dot<float>() const { return f32_dot; }
template <> inline const DotUkernel<double>& UkernelTable::dot<double>() const { return f64_dot; }
template <> inline const MaxPoolUkernels<float>& UkernelTable::maxpool<float>() const { return f32_maxpool; }
template <> inline const MaxPoolUkernels<double>& UkernelTable::maxpool<double>() const { return f64_maxpool; }
template <> inline const TransposeUkernel<float>& UkernelTable::transpose<float>() const { return f32_transpose; }
template <> inline const TransposeUkernel<double>& UkernelTable::transpose<double>() const { return f64_transpose; }
template <> inline const DwconvUkernel<float>& UkernelTable::dwconv<float>() const { return f32_dwconv; }
template <> inline const DwconvUkernel<double>& UkernelTable::dwconv<double>() const { return f64_dwconv; }

// The table of the active level (see active_isa()).
const UkernelTable& ukernels();
const UkernelTable& ukernels(Isa isa);

}  // namespace lk::cpu
