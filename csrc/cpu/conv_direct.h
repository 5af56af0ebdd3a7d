// Direct convolution for short reductions (few input channels, small
// kernels: a network's first layer), fused with bias, ReLU and a 2x2 max-pool.
// With C*R*S of 9 or 27 a GEMM spends its time packing and on microkernel
// calls too short to amortise; here each output pixel's filters sit in vector
// lanes (16 per vector), the input is broadcast tap by tap, and a 2x2 block of
// output pixels is reduced to its maximum in registers before it is stored.
// The kernels live in ukernels/conv_direct_<isa>.cpp, one per ISA level.
#pragma once
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
  const float* w;          // taps x K, K contiguous (K a multiple of 16)
  const float* bias;       // K entries, or null
  int64_t K;
  int64_t stride_h, stride_w;
  int64_t row0;            // the conv output row whose taps start at x's first row
  bool relu;
  bool pool;               // a 2x2, stride 2 max-pool of the convolution's output
  int64_t P, Q;            // output size (pooled when pool)
  int64_t p0, p1;          // output rows to compute
  float* y;                // hwc: y[(p*Q + q)*K + k]; else y[k*P*Q + p*Q + q]
  bool hwc;
  float* tile;             // Q*K floats of scratch for a row (not hwc)
};

using DirectConvFn = void (*)(const DirectConvArgs&);

// The kernel of an ISA level.
DirectConvFn direct_conv_f32(Isa isa);

}  // namespace lk::cpu
