// Convolution kernels: implicit GEMM and direct. See docs/gpu-design.md.
#include "cuda/conv2d.cuh"

#include "cuda/conv_common.cuh"

namespace lk::cuda {

namespace {

// C[Kg x N*P*Q] = W_g[Kg x CRS] x im2col_g[CRS x N*P*Q] for group blockIdx.z:
// block (x, y) computes output pixels [x * BN, +BN) (the batch folded into
// the columns, so small images still fill tiles) of filters [y * BM, +BM).
template <class T>
__global__ void __launch_bounds__(Gemm::kThreads)
    conv2d_igemm_kernel(ConvShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                        T* __restrict__ y) {
  LK_SHARED(GemmSmem<T>, sm);
  const int t = static_cast<int>(threadIdx.x);
  const int ty = t / (Gemm::BN / Gemm::TN), tx = t % (Gemm::BN / Gemm::TN);
  const int g = static_cast<int>(blockIdx.z);
  const int m0 = static_cast<int>(blockIdx.y) * Gemm::BM;
  const int j0 = static_cast<int>(blockIdx.x) * Gemm::BN;
  const int PQ = s.P * s.Q;
  const int ncols = s.N * PQ;

  ImColumn cols[kImColumns];
  LK_UNROLL
  for (int i = 0; i < kImColumns; ++i) {
    const int j = j0 + t % Gemm::kColsPerPass + i * Gemm::kColsPerPass;
    const int n = j / PQ, pq = j - n * PQ;
    cols[i] = j < ncols ? im_column(s, n, g, pq / s.Q, pq % s.Q) : no_column();
  }

  T acc[Gemm::TM][Gemm::TN];
  conv_tile(sm, acc, x, w + (g * s.Kg + m0) * s.CRS, s.Kg - m0, s, cols, t, ty, tx);

  LK_UNROLL
  for (int i = 0; i < Gemm::TM; ++i) {
    const int m = m0 + ty + i * (Gemm::BM / Gemm::TM);
    if (m >= s.Kg) continue;
    const int k = g * s.Kg + m;
    const T b = bias ? bias[k] : T(0);
    LK_UNROLL
    for (int jj = 0; jj < Gemm::TN; ++jj) {
      const int j = j0 + tx + jj * (Gemm::BN / Gemm::TN);
      if (j >= ncols) continue;
      const int n = j / PQ;
      const T v = acc[i][jj] + b;
      y[(n * s.K + k) * PQ + (j - n * PQ)] = s.relu ? dev::relu(v) : v;
    }
  }
}

constexpr int kDirectThreads = 256;

// One thread per output element, taps read straight from global memory
// (cached): no tile to fill, so nothing is wasted when a group has a single
// filter, as in a depthwise convolution.
template <class T>
__global__ void __launch_bounds__(kDirectThreads)
    conv2d_direct_kernel(ConvShape s, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                         T* __restrict__ y) {
  const long long e64 = static_cast<long long>(blockIdx.x) * kDirectThreads + threadIdx.x;
  if (e64 >= static_cast<long long>(s.N) * s.K * s.P * s.Q) return;
  const int e = static_cast<int>(e64);
  const int q = e % s.Q;
  const int p = e / s.Q % s.P;
  const int k = e / (s.P * s.Q) % s.K;
  const int n = e / (s.P * s.Q * s.K);
  const int g = k / s.Kg;
  const T* xg = x + (n * s.C + g * s.Cg) * s.H * s.W;
  const T* wk = w + k * s.CRS;
  const int h0 = p * s.stride_h - s.pad_top, w0 = q * s.stride_w - s.pad_left;
  T acc = T(0);
  for (int c = 0; c < s.Cg; ++c) {
    for (int r = 0; r < s.R; ++r) {
      const int ih = h0 + r * s.dil_h;
      if (ih < 0 || ih >= s.H) continue;
      for (int u = 0; u < s.S; ++u) {
        const int iw = w0 + u * s.dil_w;
        if (iw < 0 || iw >= s.W) continue;
        acc += xg[(c * s.H + ih) * s.W + iw] * wk[(c * s.R + r) * s.S + u];
      }
    }
  }
  const T v = acc + (bias ? bias[k] : T(0));
  y[e] = s.relu ? dev::relu(v) : v;
}

template <class T>
void run_conv2d(const Conv2dDesc& d, const T* x, const T* w, const T* bias, T* y, Stream stream, ConvKernel kernel) {
  check_conv2d(d);
  if (kernel == ConvKernel::automatic) kernel = conv2d_kernel_for(d);
  const int64_t PQ = d.P() * d.Q();
  require(d.groups <= kGridYZMax && ceil_div(d.Kg(), Gemm::BM) <= kGridYZMax,
          "groups: too many groups or filters per group for the GPU grid");
  const int64_t step = images_per_launch(d, d.K * PQ);
  for (int64_t n0 = 0; n0 < d.N; n0 += step) {
    const int64_t images = std::min(step, d.N - n0);
    const ConvShape s = conv_shape(d, images);
    const T* xn = x + n0 * d.C * d.H * d.W;
    T* yn = y + n0 * d.K * PQ;
    if (kernel == ConvKernel::direct) {
      const dim3 grid(static_cast<unsigned>(ceil_div(images * d.K * PQ, kDirectThreads)));
      launch(&conv2d_direct_kernel<T>, grid, dim3(kDirectThreads), 0, stream, s, xn, w, bias, yn);
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(images * PQ, Gemm::BN)),
                      static_cast<unsigned>(ceil_div(d.Kg(), Gemm::BM)), static_cast<unsigned>(d.groups));
      launch(&conv2d_igemm_kernel<T>, grid, dim3(Gemm::kThreads), 0, stream, s, xn, w, bias, yn);
    }
  }
}

}  // namespace

void check_conv2d(const Conv2dDesc& d) {
  require(d.N >= 0, "input: batch size must not be negative");
  require(d.C > 0 && d.H > 0 && d.W > 0, "input: expected non-zero channels, height and width");
  require(d.K > 0 && d.R > 0 && d.S > 0, "weight: expected non-zero out_channels and kernel size");
  require(d.groups > 0 && d.C % d.groups == 0 && d.K % d.groups == 0,
          "groups: must divide both in_channels and out_channels");
  require(d.stride_h > 0 && d.stride_w > 0, "stride: must be positive");
  require(d.dil_h > 0 && d.dil_w > 0, "dilation: must be positive");
  require(d.pad_top >= 0 && d.pad_bottom >= 0 && d.pad_left >= 0 && d.pad_right >= 0,
          "padding: must not be negative");
  require(d.H + d.pad_top + d.pad_bottom >= d.dil_h * (d.R - 1) + 1 &&
              d.W + d.pad_left + d.pad_right >= d.dil_w * (d.S - 1) + 1,
          "weight: kernel size with dilation is larger than the padded input");
  // Per image and for the weights; the batch is split across launches.
  // The padded extent below 2^30 keeps kNoRow plus any tap offset negative.
  require(d.C * d.H * d.W <= kInt32Max && d.K * d.P() * d.Q() <= kInt32Max && d.K * d.Cg() * d.R * d.S <= kInt32Max &&
              d.H + d.pad_top + d.pad_bottom < (int64_t{1} << 30) && d.W + d.pad_left + d.pad_right < (int64_t{1} << 30),
          "input: too large for the GPU kernels' 32-bit indexing");
}

ConvKernel conv2d_kernel_for(const Conv2dDesc& d) {
  // Below a quarter of the tile's rows, most of each implicit-GEMM tile
  // would multiply zeros.
  return d.Kg() * 4 <= Gemm::BM ? ConvKernel::direct : ConvKernel::implicit_gemm;
}

void conv2d(const Conv2dDesc& d, const float* x, const float* w, const float* bias, float* y, Stream stream,
            ConvKernel kernel) {
  run_conv2d(d, x, w, bias, y, stream, kernel);
}

void conv2d(const Conv2dDesc& d, const double* x, const double* w, const double* bias, double* y, Stream stream,
            ConvKernel kernel) {
  run_conv2d(d, x, w, bias, y, stream, kernel);
}

}  // namespace lk::cuda
