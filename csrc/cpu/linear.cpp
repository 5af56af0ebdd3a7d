#include "cpu/linear.h"

#include <algorithm>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace lk::cpu {

template <class T>
LinearPlan<T>::LinearPlan(const LinearDesc& desc, const TensorView& w, const TensorView* bias)
    : d_(desc), uk_(ukernels().gemm<T>()) {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(M >= 0 && K >= 0 && N >= 0, "input: sizes must be non-negative");
  LK_CHECK(w.ndim == 2 && w.shape[0] == N && w.shape[1] == K, "weight: expected shape (", N, ", ", K, ")");
  const int nr = uk_.nr, mr = uk_.mr;
  const int64_t Np = round_up(N, nr);
  weights_ = aligned_alloc_array<T>(Np * K);
  // B(p, j) = W[j][p]
  pack_b_panels(w.ptr<T>(), w.strides[1], w.strides[0], K, N, nr, weights_.get());
  if (d_.has_bias) {
    LK_CHECK(bias != nullptr && bias->ndim == 1 && bias->shape[0] == N, "bias: expected ", N, " entries");
    bias_ = aligned_alloc_array<T>(Np);
    for (int64_t j = 0; j < Np; ++j) bias_[j] = j < N ? bias->ptr<T>()[j * bias->strides[0]] : T(0);
  }

  const int64_t nkb = K <= 1024 ? 1 : ceil_div(K, 512);
  kc_ = std::max<int64_t>(1, ceil_div(K, nkb));
  mc_ = std::max<int64_t>(mr, std::min(round_up(M, mr), int64_t{16} * mr));
  nc_ = std::max<int64_t>(nr, std::min(Np, (256 * 1024 / (kc_ * static_cast<int64_t>(sizeof(T)))) / nr * nr));
  const double flops = 2.0 * M * K * N;
  const int pool = get_num_threads();
  threads_ = static_cast<int>(std::clamp(flops / 4e6, 1.0, static_cast<double>(pool)));
  const int64_t want = 4 * static_cast<int64_t>(threads_);
  const int64_t mblocks = ceil_div(std::max<int64_t>(M, 1), mc_);
  if (mblocks * ceil_div(Np, nc_) < want)
    nc_ = std::max<int64_t>(nr, round_up(ceil_div(Np, ceil_div(want, mblocks)), nr));
}

template <class T>
void LinearPlan<T>::run(const TensorView& x, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(x.ndim == 2 && x.shape[0] == M && x.shape[1] == K, "input: shape does not match the plan");
  if (M == 0 || N == 0) return;
  const bool relu = d_.act == Activation::relu;
  if (K == 0) {  // an empty sum: the bias alone
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const T v = bias_ ? bias_[j] : T(0);
        y[i * N + j] = relu && v < T(0) ? T(0) : v;
      }
    return;
  }
  const int mr = uk_.mr, nr = uk_.nr;
  const int64_t mblocks = ceil_div(M, mc_), nblocks = ceil_div(N, nc_);
  const T* xp = x.ptr<T>();
  parallel_for(mblocks * nblocks, threads_, [&](int64_t task) {
    const int64_t nb = task % nblocks, mb = task / nblocks;
    const int64_t i0 = mb * mc_, m = std::min(mc_, M - i0);
    const int64_t j0 = nb * nc_, n = std::min(nc_, N - j0);
    T* A = scratch_array<T>(0, static_cast<size_t>(round_up(m, mr) * kc_));
    for (int64_t pc = 0; pc < K; pc += kc_) {
      const int64_t kc = std::min(kc_, K - pc);
      pack_a_panels(xp + i0 * x.strides[0] + pc * x.strides[1], x.strides[0], x.strides[1], m, kc, mr, A);
      GemmEpilogue<T> ep;
      ep.bias = (pc == 0 && bias_) ? bias_.get() + j0 : nullptr;
      ep.bias_per_row = false;
      ep.accumulate = pc > 0;
      ep.relu = relu && pc + kc == K;
      macro_kernel(uk_, m, n, kc, A, kc * mr, weights_.get() + (j0 / nr) * K * nr + pc * nr, K * nr,
                   y + i0 * N + j0, N, ep);
    }
  });
}

template <class T>
std::string LinearPlan<T>::describe() const {
  return cat("linear ", dtype_name(dtype_of<T>()), " ukernel=", uk_.name, " kc=", kc_, " mc=", mc_, " nc=", nc_,
             " threads=", threads_);
}

template class LinearPlan<float>;
template class LinearPlan<double>;

}  // namespace lk::cpu
