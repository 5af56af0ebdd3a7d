#include "cpu/conv2d.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace lk::cpu {

const char* conv_algo_name(ConvAlgo a) {
  return a == ConvAlgo::direct ? "direct" : "implicit_gemm";
}

void validate(const Conv2dDesc& d) {
  LK_CHECK(d.N >= 0 && d.C > 0 && d.H > 0 && d.W > 0, "input: expected non-zero size for non-batch dimensions");
  LK_CHECK(d.K >= 0 && d.R > 0 && d.S > 0, "weight: kernel size must be positive");
  LK_CHECK(d.groups > 0, "groups: must be positive, got ", d.groups);
  LK_CHECK(d.C % d.groups == 0, "groups: in_channels ", d.C, " is not divisible by groups ", d.groups);
  LK_CHECK(d.K % d.groups == 0, "groups: out_channels ", d.K, " is not divisible by groups ", d.groups);
  LK_CHECK(d.stride_h > 0 && d.stride_w > 0, "stride: must be positive");
  LK_CHECK(d.dil_h > 0 && d.dil_w > 0, "dilation: must be positive");
  LK_CHECK(d.pad_top >= 0 && d.pad_left >= 0 && d.pad_bottom >= 0 && d.pad_right >= 0,
           "padding: must be non-negative");
  LK_CHECK(d.H + d.pad_top + d.pad_bottom >= d.dil_h * (d.R - 1) + 1 &&
               d.W + d.pad_left + d.pad_right >= d.dil_w * (d.S - 1) + 1,
           "weight: kernel size can't be greater than the padded input size");
}

namespace {

// First and one-past-last output column q whose input column
// q*stride + offset lies inside [0, width).
void valid_columns(int64_t offset, int64_t stride, int64_t width, int64_t Q, int64_t* lo, int64_t* hi) {
  *lo = offset >= 0 ? 0 : ceil_div(-offset, stride);
  *hi = width - 1 - offset < 0 ? 0 : (width - 1 - offset) / stride + 1;
  *lo = std::min(*lo, Q);
  *hi = std::max(std::min(*hi, Q), *lo);
}

// Packs rows [pc, pc+kc) of the implicit im2col matrix (row = (c, r, s),
// column = output pixel j in [j0, j1)) into panels of nr columns.
template <class T>
void pack_im2col(const Conv2dDesc& d, const T* x, int64_t sc, int64_t sh, int64_t sw, int64_t pc, int64_t kc,
                 int64_t j0, int64_t j1, int nr, T* dst) {
  const int64_t Q = d.Q(), RS = d.R * d.S;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const int64_t row = pc + kk, c = row / RS, r = (row % RS) / d.S, s = row % d.S;
    const T* xc = x + c * sc;
    const int64_t ih_off = r * d.dil_h - d.pad_top, iw_off = s * d.dil_w - d.pad_left;
    int64_t qlo, qhi;
    valid_columns(iw_off, d.stride_w, d.W, Q, &qlo, &qhi);
    const int64_t step = d.stride_w * sw;
    T* panel = dst + kk * nr;
    int64_t j = j0, p = j0 / Q, q = j0 % Q, jj = 0;
    while (j < j1) {
      const int64_t seg = std::min({Q - q, j1 - j, static_cast<int64_t>(nr) - jj});
      T* out = panel + jj;
      const int64_t ih = p * d.stride_h + ih_off;
      if (ih < 0 || ih >= d.H) {
        std::fill(out, out + seg, T(0));
      } else {
        const int64_t t_lo = std::clamp(qlo - q, int64_t{0}, seg), t_hi = std::clamp(qhi - q, t_lo, seg);
        std::fill(out, out + t_lo, T(0));
        const T* src = xc + ih * sh + ((q + t_lo) * d.stride_w + iw_off) * sw;
        if (step == 1)
          std::memcpy(out + t_lo, src, (t_hi - t_lo) * sizeof(T));
        else
          for (int64_t t = t_lo; t < t_hi; ++t, src += step) out[t] = *src;
        std::fill(out + t_hi, out + seg, T(0));
      }
      j += seg;
      q += seg;
      jj += seg;
      if (q == Q) q = 0, ++p;
      if (jj == nr) jj = 0, panel += kc * nr;
    }
    if (jj != 0) std::fill(panel + jj, panel + nr, T(0));
  }
}

// Threads worth using for a given amount of work: waking a worker costs a
// few microseconds, so small problems stay on the calling thread.
int threads_for(double flops) {
  const int pool = get_num_threads();
  const double per_thread = 4e6;
  return static_cast<int>(std::clamp(flops / per_thread, 1.0, static_cast<double>(pool)));
}

}  // namespace

// Copies weight (K x Cg x R x S, any strides) into K x CRS rows.
template <class T>
void flatten_weight(const TensorView& w, T* dst) {
  const T* wp = w.ptr<T>();
  for (int64_t k = 0; k < w.shape[0]; ++k)
    for (int64_t c = 0; c < w.shape[1]; ++c)
      for (int64_t r = 0; r < w.shape[2]; ++r)
        for (int64_t s = 0; s < w.shape[3]; ++s)
          *dst++ = wp[k * w.strides[0] + c * w.strides[1] + r * w.strides[2] + s * w.strides[3]];
}

template <class T>
Conv2dPlan<T>::Conv2dPlan(const Conv2dDesc& desc) : d_(desc), uk_(ukernels().gemm<T>()) {
  validate(d_);
  const int64_t Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S, P = d_.P(), Q = d_.Q(), PQ = P * Q;
  // Below 4 output channels per group the microkernel's rows would be
  // mostly padding; the direct loop wins there (depthwise above all).
  algo_ = Kg < 4 ? ConvAlgo::direct : ConvAlgo::implicit_gemm;
  threads_ = threads_for(2.0 * d_.N * d_.K * CRS * PQ);
  if (algo_ == ConvAlgo::direct) return;

  const int mr = uk_.mr, nr = uk_.nr;
  // K blocks: the whole reduction in one pass while it is short; otherwise
  // near-equal blocks of at most 512 rows so a B block stays in L2.
  const int64_t nkb = CRS <= 768 ? 1 : ceil_div(CRS, 512);
  kc_ = ceil_div(CRS, nkb);
  const int64_t l2_budget = 256 * 1024;
  nc_ = std::max<int64_t>(nr, l2_budget / (kc_ * static_cast<int64_t>(sizeof(T))) / nr * nr);
  nc_ = std::min(nc_, round_up(PQ, nr));
  // Enough tasks to keep every thread busy, without going below one panel.
  const int64_t outer = std::max<int64_t>(1, d_.N * d_.groups);
  const int64_t want_tasks = 4 * static_cast<int64_t>(threads_);
  if (outer * ceil_div(PQ, nc_) < want_tasks)
    nc_ = std::max<int64_t>(nr, round_up(ceil_div(PQ, ceil_div(want_tasks, outer)), nr));
  // Still too few (small images, many channels): split the output channels
  // too, each task packing its own copy of the pixel block.
  mc_ = round_up(Kg, mr);
  const int64_t tasks = outer * ceil_div(PQ, nc_);
  if (tasks < want_tasks) mc_ = std::max<int64_t>(mr, round_up(ceil_div(Kg, ceil_div(want_tasks, tasks)), mr));
}

template <class T>
PackedConvWeights<T> Conv2dPlan<T>::pack(const TensorView& w, const TensorView* bias) const {
  const int64_t K = d_.K, Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S;
  LK_CHECK(w.ndim == 4 && w.shape[0] == K && w.shape[1] == d_.Cg() && w.shape[2] == d_.R && w.shape[3] == d_.S,
           "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (bias != nullptr), "bias: does not match the plan");
  PackedConvWeights<T> p;
  auto flat = aligned_alloc_array<T>(K * CRS);
  flatten_weight(w, flat.get());
  if (algo_ == ConvAlgo::direct) {
    p.w = std::move(flat);
  } else {
    const int64_t group_stride = round_up(Kg, uk_.mr) * CRS;
    p.w = aligned_alloc_array<T>(d_.groups * group_stride);
    for (int64_t g = 0; g < d_.groups; ++g)
      pack_a_panels(flat.get() + g * Kg * CRS, CRS, int64_t{1}, Kg, CRS, uk_.mr, p.w.get() + g * group_stride);
    p.mr = uk_.mr;
  }
  if (bias) {
    p.bias = aligned_alloc_array<T>(K);
    for (int64_t k = 0; k < K; ++k) p.bias[k] = bias->ptr<T>()[k * bias->strides[0]];
  }
  return p;
}

template <class T>
typename Conv2dPlan<T>::Weights Conv2dPlan<T>::bind(const PackedConvWeights<T>& p) const {
  const bool panels = algo_ == ConvAlgo::implicit_gemm;
  LK_CHECK(p.mr == (panels ? uk_.mr : 0), "weight: packed for another plan");
  LK_CHECK(d_.has_bias == (p.bias != nullptr), "bias: does not match the plan");
  return {p.w.get(), panels ? 0 : d_.Cg() * d_.R * d_.S, p.bias.get()};
}

template <class T>
typename Conv2dPlan<T>::Weights Conv2dPlan<T>::bind(const TensorView* w, const TensorView* b,
                                                    BoundStorage& storage) const {
  const int64_t K = d_.K, CRS = d_.Cg() * d_.R * d_.S;
  LK_CHECK(w != nullptr && w->ndim == 4 && w->shape[0] == K && w->shape[1] == d_.Cg() && w->shape[2] == d_.R &&
               w->shape[3] == d_.S,
           "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (b != nullptr), "bias: does not match the plan");
  Weights wt{nullptr, CRS, nullptr};
  // Contiguous weights are read in place: nothing to pack per call.
  const bool rows = w->strides[3] == 1 && w->strides[2] == d_.S && w->strides[1] == d_.R * d_.S &&
                    (w->strides[0] == CRS || K == 1);
  if (rows) {
    wt.w = w->ptr<T>();
  } else {
    storage.weights = aligned_alloc_array<T>(K * CRS);
    flatten_weight(*w, storage.weights.get());
    wt.w = storage.weights.get();
  }
  if (b != nullptr && b->strides[0] == 1) {
    wt.bias = b->ptr<T>();
  } else if (b != nullptr) {
    storage.bias = aligned_alloc_array<T>(K);
    for (int64_t k = 0; k < K; ++k) storage.bias[k] = b->ptr<T>()[k * b->strides[0]];
    wt.bias = storage.bias.get();
  }
  return wt;
}

template <class T>
void Conv2dPlan<T>::check_input(const TensorView& x) const {
  LK_CHECK(x.ndim == 4 && x.shape[0] == d_.N && x.shape[1] == d_.C && x.shape[2] == d_.H && x.shape[3] == d_.W,
           "input: shape does not match the plan");
}

template <class T>
void Conv2dPlan<T>::run(const TensorView& x, const Weights& wt, T* y) const {
  check_input(x);
  if (d_.N == 0 || d_.K == 0) return;
  const int64_t K = d_.K, G = d_.groups, Kg = d_.Kg(), P = d_.P(), PQ = P * d_.Q();

  if (algo_ == ConvAlgo::direct) {
    parallel_for(d_.N * K, threads_, [&](int64_t task) {
      direct_rows(x, wt, task / K, task % K, 0, P, y + task * PQ);
    });
    return;
  }
  const int64_t nblocks = ceil_div(PQ, nc_), mblocks = ceil_div(Kg, mc_);
  parallel_for(d_.N * G * nblocks * mblocks, threads_, [&](int64_t task) {
    const int64_t mb = task % mblocks, jb = (task / mblocks) % nblocks;
    const int64_t g = (task / (mblocks * nblocks)) % G, n = task / (mblocks * nblocks * G);
    const int64_t j0 = jb * nc_, m0 = mb * mc_;
    gemm_tile(x, wt, n, g, m0, std::min(mc_, Kg - m0), j0, std::min(PQ, j0 + nc_),
              y + (n * K + g * Kg + m0) * PQ + j0, PQ);
  });
}

template <class T>
void Conv2dPlan<T>::run_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t r0, int64_t r1, T* dst,
                             int64_t ldc) const {
  const int64_t K = d_.K, G = d_.groups, Kg = d_.Kg(), Q = d_.Q();
  if (algo_ == ConvAlgo::direct) {
    for (int64_t k = 0; k < K; ++k) direct_rows(x, wt, n, k, r0, r1, dst + k * ldc);
    return;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j0 = r0 * Q; j0 < r1 * Q; j0 += nc_)
      gemm_tile(x, wt, n, g, 0, Kg, j0, std::min(r1 * Q, j0 + nc_), dst + g * Kg * ldc + (j0 - r0 * Q), ldc);
}

template <class T>
void Conv2dPlan<T>::gemm_tile(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t m0, int64_t m,
                              int64_t j0, int64_t j1, T* C, int64_t ldc) const {
  const int64_t Kg = d_.Kg(), Cg = d_.Cg(), CRS = Cg * d_.R * d_.S;
  const int nr = uk_.nr, mr = uk_.mr;
  const int64_t group_stride = wt.lda == 0 ? round_up(Kg, mr) * CRS : Kg * CRS;
  T* B = scratch_array<T>(0, static_cast<size_t>(kc_ * round_up(j1 - j0, nr)));
  const T* xg = x.ptr<T>() + n * x.strides[0] + g * Cg * x.strides[1];
  // m0 is a multiple of MR, so it starts a panel of packed weights.
  const T* A = wt.w + g * group_stride + (wt.lda == 0 ? (m0 / mr) * CRS * mr : m0 * wt.lda);
  for (int64_t pc = 0; pc < CRS; pc += kc_) {
    const int64_t kc = std::min(kc_, CRS - pc);
    pack_im2col(d_, xg, x.strides[1], x.strides[2], x.strides[3], pc, kc, j0, j1, nr, B);
    GemmEpilogue<T> ep;
    ep.bias = (pc == 0 && wt.bias) ? wt.bias + g * Kg + m0 : nullptr;
    ep.bias_per_row = true;
    ep.accumulate = pc > 0;
    ep.relu = d_.act == Activation::relu && pc + kc == CRS;
    macro_kernel(uk_, m, j1 - j0, kc, A + (wt.lda == 0 ? pc * mr : pc), CRS * mr, wt.lda, B, kc * nr, C, ldc, ep);
  }
}

template <class T>
void Conv2dPlan<T>::direct_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t k, int64_t r0,
                                int64_t r1, T* out) const {
  const int64_t Kg = d_.Kg(), Cg = d_.Cg(), R = d_.R, S = d_.S, Q = d_.Q(), g = k / Kg;
  const int64_t sc = x.strides[1], sh = x.strides[2], sw = x.strides[3];
  std::fill(out, out + (r1 - r0) * Q, wt.bias ? wt.bias[k] : T(0));
  const T* wk = wt.w + k * Cg * R * S;
  for (int64_t c = 0; c < Cg; ++c) {
    const T* xc = x.ptr<T>() + n * x.strides[0] + (g * Cg + c) * sc;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        const T wv = wk[(c * R + r) * S + s];
        const int64_t ih_off = r * d_.dil_h - d_.pad_top, iw_off = s * d_.dil_w - d_.pad_left;
        int64_t qlo, qhi;
        valid_columns(iw_off, d_.stride_w, d_.W, Q, &qlo, &qhi);
        if (qlo == qhi) continue;
        const int64_t step = d_.stride_w * sw;
        for (int64_t p = r0; p < r1; ++p) {
          const int64_t ih = p * d_.stride_h + ih_off;
          if (ih < 0 || ih >= d_.H) continue;
          T* o = out + (p - r0) * Q;
          const T* src = xc + ih * sh + (qlo * d_.stride_w + iw_off) * sw;
          if (step == 1)
            for (int64_t q = qlo; q < qhi; ++q) o[q] += wv * src[q - qlo];
          else
            for (int64_t q = qlo; q < qhi; ++q) o[q] += wv * src[(q - qlo) * step];
        }
      }
    }
  }
  if (d_.act == Activation::relu)
    for (int64_t i = 0; i < (r1 - r0) * Q; ++i) out[i] = out[i] < T(0) ? T(0) : out[i];
}

template <class T>
std::string Conv2dPlan<T>::describe() const {
  std::string s = cat("conv2d ", dtype_name(dtype_of<T>()), " algo=", conv_algo_name(algo_), " threads=", threads_);
  if (algo_ == ConvAlgo::implicit_gemm) s += cat(" ukernel=", uk_.name, " kc=", kc_, " mc=", mc_, " nc=", nc_);
  return s;
}

template class Conv2dPlan<float>;
template class Conv2dPlan<double>;

}  // namespace lk::cpu
