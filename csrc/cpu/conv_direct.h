// Direct convolution for short reductions (few input channels, small
// kernels: a network's first layer), fused with bias, ReLU and a 2x2 max-pool.
// With C*R*S of 9 or 27 a GEMM spends its time packing and on microkernel
// calls too short to amortise; here each output pixel's filters sit in vector
// lanes (16 per vector), the input is broadcast tap by tap, and a 2x2 block of
// output pixels is reduced to its maximum in registers before it is stored.
// Longer reductions over 3x3 windows (a second layer, channels interleaved)
// take Winograd's F(4x4, 3x3) instead, each output tile four pooling windows;
// a first layer's few planes F(2, 3) along rows, and a 7x7 stem at stride 2
// F(4, 4) along the rows of its column phases.
// The kernels live in ukernels/conv_direct_<isa>.cpp, one per ISA level.
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/cpu_features.h"

namespace lk::cpu {

struct DirectConvArgs {
  const float* x;          // the input rows this call reads, Wp pixels each (padding included):
                           // C planes (pix 1) or pixels of C interleaved channels (pix C)
  int64_t Wp, pix;         // pixels per row; elements from one pixel to the next in a row
  const int64_t* tap_off;  // one offset per tap (c, r, s) from a pixel's first tap: planar
                           // c*plane + r*dil_h*Wp + s*dil_w, interleaved (r*dil_h*Wp + s*dil_w)*C + c
  int64_t taps;
  const float* w;          // taps x K, K contiguous (K a multiple of 16; planes out: of 4)
  const float* bias;       // K entries, or null
  int64_t K;
  int64_t stride_h, stride_w;
  int64_t row0;            // the conv output row whose taps start at x's first row
  bool relu;
  bool pool;               // a 2x2, stride 2 max-pool of the convolution's output
  int64_t P, Q;            // output size (pooled when pool)
  int64_t p0, p1;          // output rows to compute
  int64_t q0, q1;          // and columns of them
  float* y;                // hwc: y[(p*Q + q)*K + k]; else y[k*y_plane + p*Q + q]
  int64_t y_plane = 0;     // planes out: floats from one output plane to the next (0: P*Q)
  bool hwc;
  float* tile;             // not hwc: the band's rows of pixels x channels before their transpose,
                           // (p1 - p0 rounded up to even) * Q * K floats
  // Winograd instead of the taps where every input the call reads is finite
  // and small enough (x_bound, below), the taps elsewhere (the NaN rule;
  // an infinity would spread to a whole tile):
  // - wino 4 (3x3, stride 1, pool, channels interleaved, C a multiple of 16):
  //   F(4x4, 3x3), inputs up to x_bound * kWino4Shrink; wino_w holds its
  //   filters, 36 x C x K (G g G^T, element (r, s) of the 6 x 6 at r*6 + s).
  //   It reads whole 6x6 patches: up to 2 rows and columns past the last
  //   pooled output's window, which x must hold (zeros).
  // - wino 2 (the same, unpooled): F(2x2, 3x3), likewise with 4x4 patches,
  //   2x2 outputs per tile (x holding a row and column past odd sizes); tile
  //   holds the band's rows (p1 - p0 rounded up to even). Its 16 x C x K
  //   filters go in blocks of 32 (the last 16 when K is not a multiple of 32),
  //   each contiguous, so a block streams from memory in order: element
  //   (e, c, k) at 16*C*kb + (e*C + c)*width + k - kb, kb = k rounded down to
  //   32, width = min(32, K - kb).
  // - wino 1 (planes, pool, 3x3, stride 1): F(2, 3) along the rows, inputs up
  //   to x_bound; wino_w holds its filters in groups of 16, C x 3 x 4 x 16
  //   each (G g of filter row r, element j, at (c * 3 + r) * 4 + j), and
  //   planes are `plane` floats apart.
  int wino;
  int64_t C;
  float* work;             // wino_work_floats(C) floats of scratch
  const float* wino_w = nullptr;
  int64_t plane = 0;
  // The pooled epilogue may skip the NaN rule's extra work when every input
  // value the call reads is finite and at most x_bound in magnitude (then no
  // sum overflows, so none is NaN): scan_blocks blocks of scan_len floats from
  // x, scan_stride apart. x_bound 0: always the full rule.
  float x_bound = 0;
  int64_t scan_blocks = 0, scan_len = 0, scan_stride = 0;
  // Optional (taps only, hwc): the next layer, a linear one of at most
  // kDirDenseMax outputs, fused into the epilogue. Output j's partial sums
  // gather in dense_acc[j * kDirAccStride ...] (lanes to add up afterwards):
  // each output vector times the weights of its features (p*Q + q)*K + k,
  // dense_w[j * dense_ldw + feature]. The convolution's output then needs no
  // store and the linear no pass of its own. With store_y false, y only
  // numbers the features.
  const float* dense_w = nullptr;
  int64_t dense_ldw = 0, dense_n = 0;
  float* dense_acc = nullptr;
  bool store_y = true;
  // Planes in (pix 1), unpooled, stride_w 1, channel planes out (not hwc):
  // pixels in vector lanes instead, each output vector stored whole to its
  // plane. The taps' offsets as above; tile unused.
  bool planes_out = false;
  // With planes_out, 3x3 at stride 1 on 1 to 4 planes (AVX-512): Winograd
  // F(2, 3) along the rows where every input the call reads is finite and
  // at most x_bound, the taps elsewhere; wino_w holds its filters, K x C x 3
  // x 4 (G g of filter row r, element j, at ((k * C + c) * 3 + r) * 4 + j),
  // and work wino_work_floats(C) floats.
  bool planes_wino = false;
  // With planes_out, two column phases (stride_w 2 on the input) and filters
  // 7 columns wide at dilation 1 across, on 1 to 4 planes (AVX-512):
  // Winograd F(4, 4) along the rows of each phase where every input the call
  // reads is finite and at most x_bound * kWino4Shrink, the taps elsewhere.
  // R filter rows dil_h apart, spanning at most kWinoPhaseMaxRows band rows;
  // wino_w holds its filters in blocks of 4, K / 4 x C x R x 14 x 4 (G g of
  // filter row r, phase h, element j for filter f of block kb at
  // (((kb * C + c) * R + r) * 14 + h * 7 + j) * 4 + f), and work
  // wino_work_floats(C) floats.
  bool phases_wino = false;
  int64_t R = 0, dil_h = 1;
  // The filters [k_begin, k_end) only (multiples of 16), where threads split
  // a layer's filters because its images and rows are too few to split:
  // F(2x2) and the taps without the fused linear; the other kernels take all.
  int64_t k_begin = 0, k_end = 0;
};

// F(4x4)'s transforms multiply magnitudes by up to 100 (input) and 361
// (output): its inputs (and F(2x2)'s, whose factors are smaller) stay this
// far below x_bound for no sum to overflow.
constexpr float kWino4Shrink = 1e-5f;

constexpr int64_t kDirDenseMax = 16;
constexpr int64_t kDirAccStride = 16;  // floats per output in dense_acc: the widest vector

// F(2x2)'s tiles per block: their input transforms, 16 x tiles x C floats,
// within 512 KB (half a core's L2 on the machines we tune for), reused by
// every filter, so each block reads the transformed filters once.
constexpr int64_t wino2_block_tiles(int64_t C) {
  const int64_t b = 8192 / C / 8 * 8;
  return b < 8 ? 8 : b > 64 ? 64 : b;
}

// Scratch a Winograd call needs: the input transforms of a block of tiles
// and the products of one block of filters for them (F(4x4): 36 elements x
// 4 tiles; F(2x2): 16 x wino2_block_tiles).
// The rows variant (wino 1) keeps the transforms of four input rows, 16
// tiles of 4 elements per plane, within that (C up to kWinoRowMaxPlanes).
constexpr int64_t wino_work_floats(int64_t C) {
  const int64_t f4 = 36 * 4 * (C + 32), f2 = 16 * wino2_block_tiles(C) * (C + 32);
  return f4 > f2 ? f4 : f2;
}
constexpr int64_t kWinoRowMaxPlanes = 4;
static_assert(4 * kWinoRowMaxPlanes * 4 * 16 <= wino_work_floats(kWinoRowMaxPlanes));
// The phases variant keeps the transforms of the band rows one output row
// spans, 2 x 7 x 16 floats per plane each.
constexpr int64_t kWinoPhaseMaxRows = 16;
static_assert(kWinoPhaseMaxRows * kWinoRowMaxPlanes * 2 * 7 * 16 <= wino_work_floats(kWinoRowMaxPlanes));

// Band rows for a column stride S (up to kMaxPhases): padded column j of
// input row i (`in` + i * in_row, W values `step` apart, pad_left zeros
// before it; null in: padding rows) to phase plane j % S at column j / S of
// row i, each phase row Wp wide (zeros past the input), the planes `plane`
// floats apart, rows Wp apart. The function of an ISA level: at S = 2 on
// contiguous rows, vector shuffles take both phases in one pass.
constexpr int64_t kMaxPhases = 8;
using SplitRowsFn = void (*)(float* out, int64_t plane, int64_t Wp, int64_t S, const float* in, int64_t in_row,
                             int64_t step, int64_t W, int64_t pad_left, int64_t rows);
SplitRowsFn split_rows_phases_f32(Isa isa);

using DirectConvFn = void (*)(const DirectConvArgs&);

// The kernel of an ISA level.
DirectConvFn direct_conv_f32(Isa isa);

// y[r][j] = act(bias[j] + dot(x[r], w[j])) for r < rows (1 to 4), j < n: a
// network's small linear layers on a few rows (a lane's block of images, a
// thread's share of the features). The outputs are taken in as few passes
// over x as the registers allow, split evenly (10 outputs: two of 5 on 4
// rows, one of 10 on 1 row), so no pass computes outputs it throws away.
struct DenseRowsArgs {
  int64_t k;
  const float* x;
  int64_t ldx;
  int rows;
  const float* w;  // n rows of k, ldw apart
  int64_t ldw;
  int64_t n;
  float* y;
  int64_t ldy;
  const float* bias;  // n entries, or null
  bool relu;
};
using DenseRowsFn = void (*)(const DenseRowsArgs&);
DenseRowsFn dense_rows_f32(Isa isa);

}  // namespace lk::cpu
