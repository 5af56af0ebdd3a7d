#include "cpu/linear.h"

#include <algorithm>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace lk::cpu {

template <class T>
LinearPlan<T>::LinearPlan(const LinearDesc& desc)
    : d_(desc), uk_(ukernels().gemm<T>()), dot_(ukernels().dot<T>()) {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(M >= 0 && K >= 0 && N >= 0, "input: sizes must be non-negative");
  const int nr = uk_.nr, mr = uk_.mr;
  // Packing the weight costs as much as a few rows of the product, and a
  // handful of outputs would fill the microkernel's NR columns with padding.
  algo_ = (M <= 4 || 2 * N <= nr) ? LinearAlgo::dot : LinearAlgo::gemm;
  const double flops = 2.0 * M * K * N;
  threads_ = static_cast<int>(std::clamp(flops / 4e6, 1.0, static_cast<double>(get_num_threads())));
  const int64_t want = 4 * static_cast<int64_t>(threads_);

  if (algo_ == LinearAlgo::dot) {
    // Tasks: rows of x times blocks of weight rows.
    mc_ = 1;
    nc_ = std::max<int64_t>(1, std::min<int64_t>(N, round_up(ceil_div(N, ceil_div(want, std::max<int64_t>(M, 1))), 4)));
    return;
  }
  const int64_t Np = round_up(N, nr);
  const int64_t nkb = K <= 1024 ? 1 : ceil_div(K, 512);
  kc_ = std::max<int64_t>(1, ceil_div(K, nkb));
  mc_ = std::max<int64_t>(mr, std::min(round_up(M, mr), int64_t{16} * mr));
  nc_ = std::max<int64_t>(nr, std::min(Np, (256 * 1024 / (kc_ * static_cast<int64_t>(sizeof(T)))) / nr * nr));
  const int64_t mblocks = ceil_div(std::max<int64_t>(M, 1), mc_);
  if (mblocks * ceil_div(Np, nc_) < want)
    nc_ = std::max<int64_t>(nr, round_up(ceil_div(Np, ceil_div(want, mblocks)), nr));
}

template <class T>
void LinearPlan<T>::pack_into(const TensorView& w, const TensorView* b, AlignedPtr<T>& wdst,
                              AlignedPtr<T>& bdst) const {
  const int64_t K = d_.K, N = d_.N;
  const int64_t Np = algo_ == LinearAlgo::gemm ? round_up(N, uk_.nr) : N;
  wdst = aligned_alloc_array<T>(Np * K);
  if (algo_ == LinearAlgo::gemm) {
    pack_b_panels(w.ptr<T>(), w.strides[1], w.strides[0], K, N, uk_.nr, wdst.get());  // B(p, j) = W[j][p]
  } else {
    for (int64_t j = 0; j < N; ++j)
      for (int64_t p = 0; p < K; ++p) wdst[j * K + p] = w.ptr<T>()[j * w.strides[0] + p * w.strides[1]];
  }
  if (b != nullptr) {
    bdst = aligned_alloc_array<T>(Np);
    for (int64_t j = 0; j < Np; ++j) bdst[j] = j < N ? b->ptr<T>()[j * b->strides[0]] : T(0);
  }
}

template <class T>
void LinearPlan<T>::pack(const TensorView& w, const TensorView* b) {
  LK_CHECK(w.ndim == 2 && w.shape[0] == d_.N && w.shape[1] == d_.K, "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (b != nullptr), "bias: does not match the plan");
  pack_into(w, b, weights_, bias_);
  packed_ = true;
}

template <class T>
void LinearPlan<T>::run(const TensorView& x, const TensorView* w, const TensorView* b, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(x.ndim == 2 && x.shape[0] == M && x.shape[1] == K, "input: shape does not match the plan");
  if (!packed_) {
    LK_CHECK(w != nullptr && w->ndim == 2 && w->shape[0] == N && w->shape[1] == K,
             "weight: shape does not match the plan");
    LK_CHECK(d_.has_bias == (b != nullptr), "bias: does not match the plan");
  }
  if (M == 0 || N == 0) return;
  const bool relu = d_.act == Activation::relu;
  AlignedPtr<T> wtmp, btmp;
  const T* wp = weights_.get();
  const T* bp = bias_.get();
  int64_t ldw = K;
  if (!packed_) {
    const bool in_place = algo_ == LinearAlgo::dot && w->strides[1] == 1 && (b == nullptr || b->strides[0] == 1);
    if (in_place) {
      wp = w->ptr<T>();
      ldw = w->strides[0];
      bp = b ? b->ptr<T>() : nullptr;
    } else {
      pack_into(*w, b, wtmp, btmp);
      wp = wtmp.get();
      bp = btmp.get();
    }
  }
  if (K == 0) {  // an empty sum: the bias alone
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const T v = bp ? bp[j] : T(0);
        y[i * N + j] = relu && v < T(0) ? T(0) : v;
      }
    return;
  }
  if (algo_ == LinearAlgo::dot)
    run_dot(x, wp, ldw, bp, y);
  else
    run_gemm(x, wp, bp, y);
}

template <class T>
void LinearPlan<T>::run_dot(const TensorView& x, const T* w, int64_t ldw, const T* b, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  const int64_t nblocks = ceil_div(N, nc_);
  const bool relu = d_.act == Activation::relu;
  const bool x_rows = x.strides[1] == 1;
  parallel_for(M * nblocks, threads_, [&](int64_t task) {
    const int64_t i = task / nblocks, j0 = (task % nblocks) * nc_, n = std::min(nc_, N - j0);
    const T* xi = x.ptr<T>() + i * x.strides[0];
    if (!x_rows) {  // the kernel wants a contiguous row
      T* row = scratch_array<T>(0, static_cast<size_t>(K));
      for (int64_t p = 0; p < K; ++p) row[p] = xi[p * x.strides[1]];
      xi = row;
    }
    dot_.fn(K, xi, w + j0 * ldw, ldw, n, y + i * N + j0, b ? b + j0 : nullptr, relu);
  });
}

template <class T>
void LinearPlan<T>::run_gemm(const TensorView& x, const T* w, const T* b, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  const int mr = uk_.mr, nr = uk_.nr;
  const int64_t mblocks = ceil_div(M, mc_), nblocks = ceil_div(N, nc_);
  const bool relu = d_.act == Activation::relu;
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
      ep.bias = (pc == 0 && b) ? b + j0 : nullptr;
      ep.bias_per_row = false;
      ep.accumulate = pc > 0;
      ep.relu = relu && pc + kc == K;
      macro_kernel(uk_, m, n, kc, A, kc * mr, 0, w + (j0 / nr) * K * nr + pc * nr, K * nr, y + i0 * N + j0, N, ep);
    }
  });
}

template <class T>
std::string LinearPlan<T>::describe() const {
  if (algo_ == LinearAlgo::dot)
    return cat("linear ", dtype_name(dtype_of<T>()), " algo=dot ukernel=", dot_.name, " nc=", nc_,
               " threads=", threads_);
  return cat("linear ", dtype_name(dtype_of<T>()), " algo=gemm ukernel=", uk_.name, " kc=", kc_, " mc=", mc_,
             " nc=", nc_, " threads=", threads_);
}

template class LinearPlan<float>;
template class LinearPlan<double>;

}  // namespace lk::cpu
