// Convolution backward: grad_input as a transposed direct convolution (a
// thread per input element gathers the outputs its taps fed, so nothing is
// written twice and no atomics are needed), grad_weight and grad_bias as one
// block per weight (or filter) and slice of the batch that reduces over the
// output pixels through shared memory, the slices then added in order.
// Deterministic: every sum has a fixed order.
#include "cuda/conv2d_backward.cuh"

#include <algorithm>

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

// The batch is split among blockIdx.y (`images` each) when there are too
// few weights to fill the GPU: each split writes its partial sums to its own
// slice of `out` (count elements apart), and sum_splits_kernel adds the
// slices in order, so the result does not depend on scheduling.

// Block (e, split): weight element e = (k, cg, r, u); for each image of the
// split the threads stride over its output pixels (coalesced), then add up
// in one tree.
template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_weight_kernel(ConvShape s, const T* __restrict__ go, const T* __restrict__ x, T* __restrict__ gw,
                              int images, int count) {
  using Partials = SharedArray<T, kThreads>;
  LK_SHARED(Partials, buf);
  const int e = static_cast<int>(blockIdx.x);
  const int n0 = static_cast<int>(blockIdx.y) * images, n1 = dev::min(n0 + images, s.N);
  const int u = e % s.S, r = e / s.S % s.R, cg = e / s.RS % s.Cg, k = e / s.CRS;
  const int c = k / s.Kg * s.Cg + cg;
  const int PQ = s.P * s.Q;
  T acc = T(0);
  for (int n = n0; n < n1; ++n) {
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
  if (threadIdx.x == 0) gw[static_cast<long long>(blockIdx.y) * count + e] = acc;
}

// Block (k, split): the sum of filter k's outputs over the split's images.
template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_grad_bias_kernel(ConvShape s, const T* __restrict__ go, T* __restrict__ gb, int images, int count) {
  using Partials = SharedArray<T, kThreads>;
  LK_SHARED(Partials, buf);
  const int k = static_cast<int>(blockIdx.x);
  const int n0 = static_cast<int>(blockIdx.y) * images, n1 = dev::min(n0 + images, s.N);
  const int PQ = s.P * s.Q;
  T acc = T(0);
  for (int n = n0; n < n1; ++n) {
    const T* gon = go + (static_cast<long long>(n) * s.K + k) * PQ;
    for (int pq = static_cast<int>(threadIdx.x); pq < PQ; pq += kThreads) acc += gon[pq];
  }
  acc = block_reduce<kThreads>(acc, buf, [](T a, T b) { return a + b; });
  if (threadIdx.x == 0) gb[static_cast<long long>(blockIdx.y) * count + k] = acc;
}

// out[e] = the sum of partials[i * count + e] over the splits, in order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const T* __restrict__ partials, T* __restrict__ out, int count, int splits) {
  const int e = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (e >= count) return;
  T acc = T(0);
  for (int i = 0; i < splits; ++i) acc += partials[static_cast<long long>(i) * count + e];
  out[e] = acc;
}

// Blocks worth keeping in flight for the reductions over the batch: a few
// waves of a large GPU. Fewer weights than that split the batch.
constexpr int64_t kReductionBlocks = 4096;

// One reduction over the batch for `count` outputs: kernel(..., images, count)
// on a (count, splits) grid, into `out` directly or through a workspace.
template <class T, class Kernel, class... A>
void reduce_over_batch(Kernel kernel, int64_t count, int64_t N, T* out, Stream stream, A... args) {
  const int64_t wanted = std::max<int64_t>(1, std::min({ceil_div(kReductionBlocks, count), N, kGridYZMax}));
  const int64_t images = std::max<int64_t>(1, ceil_div(N, wanted));
  const int64_t splits = std::max<int64_t>(1, ceil_div(N, images));
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(splits));
  if (splits == 1) {
    launch(kernel, grid, dim3(kThreads), 0, stream, args..., out, static_cast<int>(images), static_cast<int>(count));
    return;
  }
  Workspace<T> partials(static_cast<size_t>(splits * count), stream);
  launch(kernel, grid, dim3(kThreads), 0, stream, args..., partials.get(), static_cast<int>(images),
         static_cast<int>(count));
  launch(&sum_splits_kernel<T>, dim3(static_cast<unsigned>(ceil_div(count, kThreads))), dim3(kThreads), 0, stream,
         static_cast<const T*>(partials.get()), out, static_cast<int>(count), static_cast<int>(splits));
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
  if (gw) reduce_over_batch(&conv2d_grad_weight_kernel<T>, d.K * d.Cg() * d.R * d.S, d.N, gw, stream, s, go, x);
  if (gb) reduce_over_batch(&conv2d_grad_bias_kernel<T>, d.K, d.N, gb, stream, s, go);
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
