// The block tile of the GEMM kernels (convolution as implicit GEMM, the fused
// convolution and pooling, linear): C[BM x BN] += A[BM x BK] * B[BK x BN]
// per step along the reduction, both operands staged in shared memory,
// each thread accumulating a TM x TN sub-tile in registers.
#pragma once
#include "cuda/portability.cuh"

namespace lk::cuda {

struct Gemm {
  static constexpr int BM = 64;  // rows of C per block (output channels, or input rows of linear)
  static constexpr int BN = 64;  // columns of C per block (output pixels, or output features)
  static constexpr int BK = 8;   // reduction step
  static constexpr int TM = 4, TN = 4;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
  // Rows of a K-contiguous operand loaded per pass: the BK threads of a row
  // read BK neighbouring elements (one 32-byte sector of float).
  static constexpr int kRowsPerPass = kThreads / BK;
  // Columns of the im2col operand per pass: a warp reads 32 neighbouring
  // output pixels of one reduction row.
  static constexpr int kColsPerPass = 32;
  // Tiles are stored k-major (tile[k][row]) so that the inner product reads
  // rows of both; the K-contiguous loads write them transposed, and without
  // padding the BK threads of one row would hit one bank.
  static constexpr int kPad = 4;

  static_assert(kThreads % BK == 0 && BM % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "K-major load split");
  static_assert(kThreads / kColsPerPass == BK && BN % kColsPerPass == 0, "im2col load split");
};

template <class T>
using GemmOperand = SharedArray2<T, Gemm::BK, Gemm::BM + Gemm::kPad>;
static_assert(Gemm::BM == Gemm::BN, "one operand type for A and B");

template <class T>
struct GemmSmem {
  GemmOperand<T> a;  // a[k][m]
  GemmOperand<T> b;  // b[k][n]
};

// dst[k][r] = src[r * ld + k0 + k] for r < rows and k0 + k < kdim, else 0:
// a tile of a row-major matrix whose rows run along the reduction.
template <class T>
__device__ __forceinline__ void load_k_major(GemmOperand<T>& dst, const T* __restrict__ src, int ld, int rows,
                                             int k0, int kdim, int t) {
  const int k = t % Gemm::BK;
  const int r0 = t / Gemm::BK;
  const bool k_ok = k0 + k < kdim;
  LK_UNROLL
  for (int i = 0; i < Gemm::BM / Gemm::kRowsPerPass; ++i) {
    const int r = r0 + i * Gemm::kRowsPerPass;
    dst[k][r] = k_ok && r < rows ? src[r * ld + k0 + k] : T(0);
  }
}

// dst[k][c] = src[(k0 + k) * ld + c] for k0 + k < kdim and c < cols, else 0:
// a tile of a row-major matrix whose rows are the reduction (the tile's
// columns are contiguous in memory, as in the B operand of C = A B). Thread t
// loads row t / kColsPerPass, columns t % kColsPerPass + i * kColsPerPass: a
// warp reads 32 consecutive elements.
template <class T>
__device__ __forceinline__ void load_mn_major(GemmOperand<T>& dst, const T* __restrict__ src, int ld, int cols,
                                              int k0, int kdim, int t) {
  const int k = t / Gemm::kColsPerPass;
  const int c0 = t % Gemm::kColsPerPass;
  const bool k_ok = k0 + k < kdim;
  LK_UNROLL
  for (int i = 0; i < Gemm::BM / Gemm::kColsPerPass; ++i) {
    const int c = c0 + i * Gemm::kColsPerPass;
    dst[k][c] = k_ok && c < cols ? src[(k0 + k) * ld + c] : T(0);
  }
}

// acc += the product of the staged tiles. Thread (ty, tx) owns rows
// ty + i * BM/TM and columns tx + j * BN/TN: interleaved rather than
// contiguous, so that a warp's reads of b and its stores of C touch
// consecutive addresses.
template <class T>
__device__ __forceinline__ void gemm_step(const GemmSmem<T>& sm, T (&acc)[Gemm::TM][Gemm::TN], int ty, int tx) {
  LK_UNROLL
  for (int k = 0; k < Gemm::BK; ++k) {
    T a[Gemm::TM], b[Gemm::TN];
    LK_UNROLL
    for (int i = 0; i < Gemm::TM; ++i) a[i] = sm.a[k][ty + i * (Gemm::BM / Gemm::TM)];
    LK_UNROLL
    for (int j = 0; j < Gemm::TN; ++j) b[j] = sm.b[k][tx + j * (Gemm::BN / Gemm::TN)];
    LK_UNROLL
    for (int i = 0; i < Gemm::TM; ++i) {
      LK_UNROLL
      for (int j = 0; j < Gemm::TN; ++j) acc[i][j] += a[i] * b[j];
    }
  }
}

}  // namespace lk::cuda
