// Linear backward: two GEMMs through the block tile of gemm_tile.cuh and a
// column sum. See docs/gpu-design.md.
#include "cuda/linear_backward.cuh"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/gemm_tile.cuh"

namespace lk::cuda {

namespace {

// C[M x N] = op(A) op(B) with C row-major; the reduction is K. A is stored
// M x K (k contiguous) or, transposed, K x M; B is stored K x N (n
// contiguous) or, transposed, N x K. lda, ldb: row lengths as stored.
struct GemmShape {
  int M, N, K, lda, ldb;
};

template <class T, bool TransA, bool TransB>
__global__ void __launch_bounds__(Gemm::kThreads)
    gemm_kernel(GemmShape s, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c) {
  LK_SHARED(GemmSmem<T>, sm);
  const int t = static_cast<int>(threadIdx.x);
  const int ty = t / (Gemm::BN / Gemm::TN), tx = t % (Gemm::BN / Gemm::TN);
  const int m0 = static_cast<int>(blockIdx.y) * Gemm::BM;
  const int n0 = static_cast<int>(blockIdx.x) * Gemm::BN;

  T acc[Gemm::TM][Gemm::TN] = {};
  for (int k0 = 0; k0 < s.K; k0 += Gemm::BK) {
    if constexpr (TransA) {
      load_mn_major(sm.a, a + m0, s.lda, s.M - m0, k0, s.K, t);
    } else {
      load_k_major(sm.a, a + m0 * s.lda, s.lda, s.M - m0, k0, s.K, t);
    }
    if constexpr (TransB) {
      load_k_major(sm.b, b + n0 * s.ldb, s.ldb, s.N - n0, k0, s.K, t);
    } else {
      load_mn_major(sm.b, b + n0, s.ldb, s.N - n0, k0, s.K, t);
    }
    __syncthreads();  // the tiles are complete
    gemm_step(sm, acc, ty, tx);
    __syncthreads();  // everyone is done reading them before the next step overwrites them
  }

  LK_UNROLL
  for (int i = 0; i < Gemm::TM; ++i) {
    const int m = m0 + ty + i * (Gemm::BM / Gemm::TM);
    if (m >= s.M) continue;
    LK_UNROLL
    for (int j = 0; j < Gemm::TN; ++j) {
      const int n = n0 + tx + j * (Gemm::BN / Gemm::TN);
      if (n < s.N) c[m * s.N + n] = acc[i][j];
    }
  }
}

constexpr int kSumThreads = 256;

// out[n] = sum over m of x[m * N + n]: a thread per column, neighbouring
// threads on neighbouring columns (coalesced). An empty column sums to 0.
template <class T>
__global__ void __launch_bounds__(kSumThreads) column_sum_kernel(const T* __restrict__ x, T* __restrict__ out, int M,
                                                                 int N) {
  const int n = static_cast<int>(blockIdx.x) * kSumThreads + static_cast<int>(threadIdx.x);
  if (n >= N) return;
  T acc = T(0);
  for (int m = 0; m < M; ++m) acc += x[m * N + n];
  out[n] = acc;
}

template <class T, bool TransA, bool TransB>
void run_gemm(const GemmShape& s, const T* a, const T* b, T* c, Stream stream) {
  if (s.M == 0 || s.N == 0) return;
  require(ceil_div(s.M, Gemm::BM) <= kGridYZMax, "input: too many rows for the GPU grid");
  const dim3 grid(static_cast<unsigned>(ceil_div(s.N, Gemm::BN)), static_cast<unsigned>(ceil_div(s.M, Gemm::BM)));
  launch(&gemm_kernel<T, TransA, TransB>, grid, dim3(Gemm::kThreads), 0, stream, s, a, b, c);
}

template <class T>
void run_linear_backward(const LinearDesc& d, const T* go, const T* x, const T* w, T* gi, T* gw, T* gb,
                         Stream stream) {
  require(d.M >= 0 && d.N >= 0 && d.K >= 0, "linear_backward: sizes must not be negative");
  require(d.act == Activation::none, "activation: linear_backward takes the gradient before the activation");
  require(d.M * d.K <= kInt32Max && d.M * d.N <= kInt32Max && d.N * d.K <= kInt32Max,
          "input: too large for the GPU kernels' 32-bit indexing");
  const int M = static_cast<int>(d.M), N = static_cast<int>(d.N), K = static_cast<int>(d.K);
  // grad_input[M x K] = grad_output[M x N] W[N x K]
  if (gi) run_gemm<T, false, false>({M, K, N, N, K}, go, w, gi, stream);
  // grad_weight[N x K] = grad_output^T (stored M x N) x[M x K]
  if (gw) run_gemm<T, true, false>({N, K, M, N, K}, go, x, gw, stream);
  if (gb && N > 0)
    launch(&column_sum_kernel<T>, dim3(static_cast<unsigned>(ceil_div(N, kSumThreads))), dim3(kSumThreads), 0,
           stream, go, gb, M, N);
}

}  // namespace

void linear_backward(const LinearDesc& d, const float* grad_output, const float* x, const float* w,
                     float* grad_input, float* grad_weight, float* grad_bias, Stream stream) {
  run_linear_backward(d, grad_output, x, w, grad_input, grad_weight, grad_bias, stream);
}

void linear_backward(const LinearDesc& d, const double* grad_output, const double* x, const double* w,
                     double* grad_input, double* grad_weight, double* grad_bias, Stream stream) {
  run_linear_backward(d, grad_output, x, w, grad_input, grad_weight, grad_bias, stream);
}

}  // namespace lk::cuda
