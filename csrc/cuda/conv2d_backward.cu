// Convolution backward: grad_input as a transposed direct convolution (a
// thread per input element gathers the outputs its taps fed, so nothing is
// written twice and no atomics are needed), grad_weight and grad_bias as one
// block per weight (or filter) that reduces over the batch and the output
// pixels through shared memory. Deterministic: every sum has a fixed order.
#include "cuda/conv2d_backward.cuh"

#include "cuda/conv2d.cuh"
#include "cuda/conv_common.cuh"

namespace lk::cuda {

namespace {

constexpr int kThreads = 256;

// Thread e: input element (n, c, h, w). An output (p, q) read it through
// tap (r, u) when h = p * stride_h - pad_top + r * dil_h (same along w).
template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_input_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ w, T* __restrict__ gi,
                             long long total) {
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  const int iw = static_cast<int>(e % s.W);
  const int ih = static_cast<int>(e / s.W % s.H);
  const int c = static_cast<int>(e / (static_cast<long long>(s.H) * s.W) % s.C);
  const long long n = e / (static_cast<long long>(s.C) * s.H * s.W);
  const int g = c / s.Cg, cg = c - g * s.Cg;
  const int PQ = s.P * s.Q;
  T acc = T(0);
  for (int kk = 0; kk < s.Kg; ++kk) {
    const int k = g * s.Kg + kk;
    const T* gok = go + (n * s.K + k) * PQ;
    const T* wk = w + (k * s.Cg + cg) * s.RS;
    for (int r = 0; r < s.R; ++r) {
      const int hh = ih + s.pad_top - r * s.dil_h;
      if (hh < 0 || hh % s.stride_h) continue;
      const int p = hh / s.stride_h;
      if (p >= s.P) continue;
      for (int u = 0; u < s.S; ++u) {
        const int ww = iw + s.pad_left - u * s.dil_w;
        if (ww < 0 || ww % s.stride_w) continue;
        const int q = ww / s.stride_w;
        if (q >= s.Q) continue;
        acc += gok[p * s.Q + q] * wk[r * s.S + u];
      }
    }
  }
  gi[e] = acc;
}

// Block e: weight element (k, cg, r, u); for each image the threads stride
// over its output pixels (coalesced), then add up in one tree.
template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_weight_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ x, T* __restrict__ gw) {
  using Partials = SharedArray<T, kThreads>;
  LK_SHARED(Partials, buf);
  const int e = static_cast<int>(blockIdx.x);
  const int u = e % s.S, r = e / s.S % s.R, cg = e / s.RS % s.Cg, k = e / s.CRS;
  const int c = k / s.Kg * s.Cg + cg;
  const int PQ = s.P * s.Q;
  T acc = T(0);
  for (int n = 0; n < s.N; ++n) {
    const T* gon = go + (static_cast<long long>(n) * s.K + k) * PQ;
    const T* xn = x + (static_cast<long long>(n) * s.C + c) * s.H * s.W;
    for (int pq = static_cast<int>(threadIdx.x); pq < PQ; pq += kThreads) {
      const int p = pq / s.Q, q = pq - p * s.Q;
      const int ih = p * s.stride_h - s.pad_top + r * s.dil_h;
      const int iw = q * s.stride_w - s.pad_left + u * s.dil_w;
      if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) acc += gon[pq] * xn[ih * s.W + iw];
    }
  }
  acc = block_reduce<kThreads>(acc, buf, [](T a, T b) { return a + b; });
  if (threadIdx.x == 0) gw[e] = acc;
}

// Block k: the sum of filter k's outputs over the batch.
template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_bias_kernel(ConvShape s, const T* __restrict__ go, T* __restrict__ gb) {
  using Partials = SharedArray<T, kThreads>;
  LK_SHARED(Partials, buf);
  const int k = static_cast<int>(blockIdx.x);
  const int PQ = s.P * s.Q;
  T acc = T(0);
  for (int n = 0; n < s.N; ++n) {
    const T* gon = go + (static_cast<long long>(n) * s.K + k) * PQ;
    for (int pq = static_cast<int>(threadIdx.x); pq < PQ; pq += kThreads) acc += gon[pq];
  }
  acc = block_reduce<kThreads>(acc, buf, [](T a, T b) { return a + b; });
  if (threadIdx.x == 0) gb[k] = acc;
}

template <class T>
void run_conv2d_backward(const Conv2dDesc& d, const T* go, const T* x, const T* w, T* gi, T* gw, T* gb,
                         Stream stream) {
  check_conv2d_backward(d);
  // The batch stays whole: batch-dependent offsets are 64-bit in these kernels.
  const ConvShape s = conv_shape(d, d.N);
  if (gi && d.N > 0) {
    const long long total = d.N * d.C * d.H * d.W;
    launch(&conv2d_grad_input_kernel<T>, dim3(static_cast<unsigned>(ceil_div(total, kThreads))), dim3(kThreads), 0,
           stream, s, go, w, gi, total);
  }
  if (gw)
    launch(&conv2d_grad_weight_kernel<T>, dim3(static_cast<unsigned>(d.K * d.Cg() * d.R * d.S)), dim3(kThreads), 0,
           stream, s, go, x, gw);
  if (gb)
    launch(&conv2d_grad_bias_kernel<T>, dim3(static_cast<unsigned>(d.K)), dim3(kThreads), 0, stream, s, go, gb);
}

}  // namespace

void check_conv2d_backward(const Conv2dDesc& d) {
  check_conv2d(d);
  require(d.act == Activation::none, "activation: conv2d_backward takes the gradient before the activation");
  require(d.N <= kInt32Max && ceil_div(d.N * d.C * d.H * d.W, kThreads) <= kInt32Max,
          "input: too large for one GPU grid");
}

void conv2d_backward(const Conv2dDesc& d, const float* grad_output, const float* x, const float* w,
                     float* grad_input, float* grad_weight, float* grad_bias, Stream stream) {
  run_conv2d_backward(d, grad_output, x, w, grad_input, grad_weight, grad_bias, stream);
}

void conv2d_backward(const Conv2dDesc& d, const double* grad_output, const double* x, const double* w,
                     double* grad_input, double* grad_weight, double* grad_bias, Stream stream) {
  run_conv2d_backward(d, grad_output, x, w, grad_input, grad_weight, grad_bias, stream);
}

}  // namespace lk::cuda
