// Convolution geometry shared by conv2d.cu and conv_pool.cu: the int32 shape
// a kernel sees, the batch split that keeps it int32, and the im2col operand
// of the implicit GEMM (gathered from the input on the fly, never
// materialised). The checks are check_conv2d (conv2d.cuh).
#pragma once
#include <algorithm>
#include <string>

#include "core/descriptors.h"
#include "cuda/common.cuh"
#include "cuda/gemm_tile.cuh"

namespace lk::cuda {

// One launch's convolution, N being the images of that launch.
struct ConvShape {
  int N, C, H, W;
  int K, R, S, groups, Cg, Kg;
  int P, Q;
  int stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int RS, CRS;  // R * S and Cg * R * S: the reduction length
  bool relu;
};

inline ConvShape conv_shape(const Conv2dDesc& d, int64_t images) {
  ConvShape s;
  s.N = static_cast<int>(images);
  s.C = static_cast<int>(d.C), s.H = static_cast<int>(d.H), s.W = static_cast<int>(d.W);
  s.K = static_cast<int>(d.K), s.R = static_cast<int>(d.R), s.S = static_cast<int>(d.S);
  s.groups = static_cast<int>(d.groups);
  s.Cg = static_cast<int>(d.Cg()), s.Kg = static_cast<int>(d.Kg());
  s.P = static_cast<int>(d.P()), s.Q = static_cast<int>(d.Q());
  s.stride_h = static_cast<int>(d.stride_h), s.stride_w = static_cast<int>(d.stride_w);
  s.pad_top = static_cast<int>(d.pad_top), s.pad_left = static_cast<int>(d.pad_left);
  s.dil_h = static_cast<int>(d.dil_h), s.dil_w = static_cast<int>(d.dil_w);
  s.RS = s.R * s.S;
  s.CRS = s.Cg * s.RS;
  s.relu = d.act == Activation::relu;
  return s;
}

// Images per launch so that every element offset of the input and of an
// output with `out_per_image` elements per image fits in int32.
inline int64_t images_per_launch(const Conv2dDesc& d, int64_t out_per_image) {
  const int64_t per_image = std::max(d.C * d.H * d.W, out_per_image);
  return std::max<int64_t>(1, std::min(d.N, kInt32Max / per_image));
}

// One column of the im2col operand: an output pixel, as the offset of its
// image's first channel of the group and the input position of its (0, 0)
// tap. A column past the end gets a row so far above the input that every
// tap falls outside it.
struct ImColumn {
  int base, h, w;
};

__device__ __forceinline__ ImColumn im_column(const ConvShape& s, int n, int g, int p, int q) {
  return {(n * s.C + g * s.Cg) * s.H * s.W, p * s.stride_h - s.pad_top, q * s.stride_w - s.pad_left};
}

constexpr int kNoRow = -(1 << 30);
__device__ __forceinline__ ImColumn no_column() { return {0, kNoRow, 0}; }

constexpr int kImColumns = Gemm::BN / Gemm::kColsPerPass;  // columns each thread loads

// b[kr][c] = the input pixel that reduction row k0 + kr (channel, tap) reads
// for column c, 0 in the padding or past the end. Thread t loads row
// t / kColsPerPass, columns t % kColsPerPass + i * kColsPerPass.
template <class T>
__device__ __forceinline__ void load_im2col(GemmOperand<T>& b, const T* __restrict__ x, const ConvShape& s,
                                            const ImColumn (&cols)[kImColumns], int k0, int t) {
  const int kr = t / Gemm::kColsPerPass;
  const int c0 = t % Gemm::kColsPerPass;
  const int kk = k0 + kr;
  const bool k_ok = kk < s.CRS;
  int chan = 0, dr = 0, ds = 0;
  if (k_ok) {
    const int c = kk / s.RS;
    const int rs = kk - c * s.RS;
    const int r = rs / s.S;
    chan = c * s.H * s.W;
    dr = r * s.dil_h;
    ds = (rs - r * s.S) * s.dil_w;
  }
  LK_UNROLL
  for (int i = 0; i < kImColumns; ++i) {
    const int ih = cols[i].h + dr, iw = cols[i].w + ds;
    const bool inside = k_ok && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
    b[kr][c0 + i * Gemm::kColsPerPass] = inside ? x[cols[i].base + chan + ih * s.W + iw] : T(0);
  }
}

// The whole reduction for one block tile: acc = W[rows of the tile] x
// im2col[columns of the tile]. w points at the tile's first filter row
// (rows filters left from there, each CRS long).
template <class T>
__device__ __forceinline__ void conv_tile(GemmSmem<T>& sm, T (&acc)[Gemm::TM][Gemm::TN], const T* __restrict__ x,
                                          const T* __restrict__ w, int rows, const ConvShape& s,
                                          const ImColumn (&cols)[kImColumns], int t, int ty, int tx) {
  LK_UNROLL
  for (int i = 0; i < Gemm::TM; ++i) {
    LK_UNROLL
    for (int j = 0; j < Gemm::TN; ++j) acc[i][j] = T(0);
  }
  for (int k0 = 0; k0 < s.CRS; k0 += Gemm::BK) {
    load_k_major(sm.a, w, s.CRS, rows, k0, s.CRS, t);
    load_im2col(sm.b, x, s, cols, k0, t);
    __syncthreads();  // the tiles are complete
    gemm_step(sm, acc, ty, tx);
    __syncthreads();  // everyone is done reading them before the next step overwrites them
  }
}

}  // namespace lk::cuda
