// Linear kernels: a tiled GEMM, and a dot-product kernel for skinny shapes.
#include "cuda/linear.cuh"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/gemm_tile.cuh"

namespace lk::cuda {

namespace {

struct LinearShape {
  int M, N, K;
  bool relu;
};

// Block (x, y): features [x * BN, +BN) of rows [y * BM, +BM). Both operands
// run along K in memory, so both load through load_k_major.
template <class T>
__global__ void __launch_bounds__(Gemm::kThreads)
    linear_gemm_kernel(LinearShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                       T* __restrict__ y) {
  LK_SHARED(GemmSmem<T>, sm);
  const int t = static_cast<int>(threadIdx.x);
  const int ty = t / (Gemm::BN / Gemm::TN), tx = t % (Gemm::BN / Gemm::TN);
  const int m0 = static_cast<int>(blockIdx.y) * Gemm::BM;
  const int n0 = static_cast<int>(blockIdx.x) * Gemm::BN;
  const T* xt = x + m0 * s.K;
  const T* wt = w + n0 * s.K;

  T acc[Gemm::TM][Gemm::TN] = {};
  for (int k0 = 0; k0 < s.K; k0 += Gemm::BK) {
    load_k_major(sm.a, xt, s.K, s.M - m0, k0, s.K, t);
    load_k_major(sm.b, wt, s.K, s.N - n0, k0, s.K, t);
    __syncthreads();  // the tiles are complete
    gemm_step(sm, acc, ty, tx);
    __syncthreads();  // everyone is done reading them before the next step overwrites them
  }

  LK_UNROLL
  for (int j = 0; j < Gemm::TN; ++j) {
    const int n = n0 + tx + j * (Gemm::BN / Gemm::TN);
    if (n >= s.N) continue;
    const T b = bias ? bias[n] : T(0);
    LK_UNROLL
    for (int i = 0; i < Gemm::TM; ++i) {
      const int m = m0 + ty + i * (Gemm::BM / Gemm::TM);
      if (m >= s.M) continue;
      const T v = acc[i][j] + b;
      y[m * s.N + n] = s.relu ? dev::relu(v) : v;
    }
  }
}

constexpr int kDotThreads = 128;
constexpr int kDotRows = 4;

// Block (x, y): feature x for rows [y * kDotRows, +kDotRows). The threads
// stride along K (coalesced reads of the weight row, each read once per
// block), then add up their partial sums of all rows in one tree.
template <class T>
__global__ void __launch_bounds__(kDotThreads)
    linear_dot_kernel(LinearShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                      T* __restrict__ y) {
  using Partials = SharedArray2<T, kDotRows, kDotThreads>;
  LK_SHARED(Partials, sum);
  const int t = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(blockIdx.x);
  const int m0 = static_cast<int>(blockIdx.y) * kDotRows;
  const int rows = dev::min(kDotRows, s.M - m0);
  const T* wn = w + n * s.K;
  const T* xm = x + m0 * s.K;
  T acc[kDotRows] = {};
  for (int k = t; k < s.K; k += kDotThreads) {
    const T wv = wn[k];
    LK_UNROLL
    for (int r = 0; r < kDotRows; ++r)
      if (r < rows) acc[r] += xm[r * s.K + k] * wv;
  }
  LK_UNROLL
  for (int r = 0; r < kDotRows; ++r) sum[r][t] = acc[r];
  __syncthreads();
  for (int half = kDotThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      LK_UNROLL
      for (int r = 0; r < kDotRows; ++r) sum[r][t] += sum[r][t + half];
    }
    __syncthreads();
  }
  if (t < rows) {
    const T v = sum[t][0] + (bias ? bias[n] : T(0));
    y[(m0 + t) * s.N + n] = s.relu ? dev::relu(v) : v;
  }
}

template <class T>
void run_linear(const LinearDesc& d, const T* x, const T* w, const T* bias, T* y, Stream stream, LinearKernel kernel) {
  require(d.M >= 0 && d.N >= 0 && d.K >= 0, "linear: sizes must not be negative");
  require(d.N * d.K <= kInt32Max && d.N <= kInt32Max && d.K <= kInt32Max,
          "weight: too large for the GPU kernels' 32-bit indexing");
  if (kernel == LinearKernel::automatic) kernel = linear_kernel_for(d);
  if (d.M == 0 || d.N == 0) return;
  // Rows per launch: element offsets of x and y, and the grid's y extent.
  const int64_t rows_per_block = kernel == LinearKernel::dot ? kDotRows : Gemm::BM;
  const int64_t step = std::max<int64_t>(
      1, std::min(kInt32Max / std::max<int64_t>({d.K, d.N, 1}), kGridYZMax * rows_per_block));
  for (int64_t m0 = 0; m0 < d.M; m0 += step) {
    const LinearShape s{static_cast<int>(std::min(step, d.M - m0)), static_cast<int>(d.N), static_cast<int>(d.K),
                        d.act == Activation::relu};
    const T* xm = x + m0 * d.K;
    T* ym = y + m0 * d.N;
    if (kernel == LinearKernel::dot) {
      const dim3 grid(static_cast<unsigned>(d.N), static_cast<unsigned>(ceil_div(s.M, kDotRows)));
      launch(&linear_dot_kernel<T>, grid, dim3(kDotThreads), 0, stream, s, xm, w, bias, ym);
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(d.N, Gemm::BN)), static_cast<unsigned>(ceil_div(s.M, Gemm::BM)));
      launch(&linear_gemm_kernel<T>, grid, dim3(Gemm::kThreads), 0, stream, s, xm, w, bias, ym);
    }
  }
}

}  // namespace

LinearKernel linear_kernel_for(const LinearDesc& d) {
  // A GEMM tile over a handful of rows or features is mostly padding, and
  // such shapes give too few tiles to fill the GPU.
  return d.M < 16 || d.N < 16 ? LinearKernel::dot : LinearKernel::gemm;
}

void linear(const LinearDesc& d, const float* x, const float* w, const float* bias, float* y, Stream stream,
            LinearKernel kernel) {
  run_linear(d, x, w, bias, y, stream, kernel);
}

void linear(const LinearDesc& d, const double* x, const double* w, const double* bias, double* y, Stream stream,
            LinearKernel kernel) {
  run_linear(d, x, w, bias, y, stream, kernel);
}

}  // namespace lk::cuda
