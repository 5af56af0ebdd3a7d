#include "cpu/linear.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "cpu/machine.h"

namespace lk::cpu {

namespace {
constexpr double kDotEfficiency = 0.5;  // the dot kernel against the GEMM microkernel's rate
constexpr int64_t kGemvRows = 8;        // input rows up to which a layer's weight goes in gemv's panels
}  // namespace

template <class T>
LinearPlan<T>::LinearPlan(const LinearDesc& desc, bool prepacked, bool few_row_panels)
    : d_(desc), table_(&ukernels()), uk_(table_->gemm<T>()), dot_(table_->dot<T>()) {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(M >= 0 && K >= 0 && N >= 0, "input: sizes must be non-negative");
  // Packing the weight costs as much as a few rows of the product, and a
  // handful of outputs would fill the microkernel's NR columns with padding.
  // Without a layer packing the weight once, the transposed GEMM packs the
  // input instead, when that is the smaller operand.
  algo_ = (M <= 8 || 2 * N <= uk_.nr) ? LinearAlgo::dot
          : (!prepacked && M < N)   ? LinearAlgo::gemm_t
                                    : LinearAlgo::gemm;
  // A few rows against a weight that a layer packs once: the panels, unless
  // their padding (read like weights) would add more than a quarter. They
  // stream faster than the dot kernel reads rows, in L2 as from L3 (one
  // row, one thread: 512 -> 256 features 5.9 us against 7.5, 1024 -> 128
  // 5.7 against 8.9, 128 -> 128 1.5 against 2.1), and each row block of up
  // to four uses every weight vector it reads.
  if (prepacked && few_row_panels && M >= 1 && M <= kGemvRows && 4 * round_up(N, dot_.gemv_nr) <= 5 * N)
    algo_ = LinearAlgo::gemv;
  if (algo_ == LinearAlgo::gemm_t) {  // rows: features, columns: input rows; the shape padding M least
    const UkernelTable& t = *table_;
    for (int shape = 1; shape < kGemmShapes; ++shape) {
      const GemmUkernel<T>& u = t.gemm<T>(shape);
      if (round_up(M, u.nr) * round_up(N, u.mr) < round_up(M, uk_.nr) * round_up(N, uk_.mr)) uk_ = u;
    }
  }
  const int nr = uk_.nr, mr = uk_.mr;

  // The cost model: the dot kernel streams the weights and reaches a
  // fraction of the GEMM rate (loads feed its FMAs); the GEMM runs near the
  // microkernel's rate on padded tiles. Threads share the bandwidth, and a
  // second thread pays the hand-over. The thread count minimises the time.
  const MachineModel& model = machine_model();
  const double rate = model.gemm_flops[sizeof(T) == 8][0];
  const double flops = algo_ == LinearAlgo::dot      ? 2.0 * M * K * N / kDotEfficiency
                       : algo_ == LinearAlgo::gemv   ? 2.0 * M * K * round_up(N, dot_.gemv_nr) / kDotEfficiency
                       : algo_ == LinearAlgo::gemm_t ? 2.0 * round_up(N, mr) * K * round_up(M, nr)
                                                     : 2.0 * round_up(M, mr) * K * round_up(N, nr);
  double bytes = static_cast<double>(sizeof(T)) * (M * K + N * K + M * N);
  // A layer's weight, read at every call of a few rows, comes from the
  // caches up to their size (half the 32 MB L3 of the machines measured): no
  // main-memory term there, or every small layer would take a second thread
  // (64 x 64: 1.03 us on one thread, 1.23 on two).
  if (algo_ == LinearAlgo::gemv && bytes < (16 << 20)) bytes = 0;
  auto predict = [&](int t) {
    return std::max(flops / (rate * t), bytes / (model.bandwidth * std::min(t, 2))) + (t > 1 ? model.wake_s : 0);
  };
  threads_ = 1;
  for (int t = 2; t <= get_num_threads(); ++t)
    if (predict(t) < predict(threads_)) threads_ = t;
  predicted_s_ = predict(threads_);
  const int64_t want = 4 * static_cast<int64_t>(threads_);
  if (algo_ == LinearAlgo::gemv) {
    // One run of panels per thread: each thread then reads the same part of
    // the weight at every call, so whatever of it its caches kept is reused.
    nc_ = round_up(ceil_div(N, threads_), dot_.gemv_nr);
    return;
  }
  if (algo_ == LinearAlgo::dot) {
    // Tasks: blocks of 4 input rows times blocks of weight rows.
    mc_ = 4;
    const int64_t row_blocks = std::max<int64_t>(1, ceil_div(M, 4));
    nc_ = std::max<int64_t>(1, std::min<int64_t>(N, round_up(ceil_div(N, ceil_div(want, row_blocks)), 4)));
    return;
  }
  // gemm: the whole reduction in one block up to 4096 (C stays in registers,
  // and B's micro-panel, at most 4096 x NR, streams from L2 well enough).
  // gemm_t packs a kc x nc block of the input per task: blocks of 512.
  const int64_t nkb = algo_ == LinearAlgo::gemm ? ceil_div(K, 4096) : K <= 1024 ? 1 : ceil_div(K, 512);
  kc_ = std::max<int64_t>(1, ceil_div(K, nkb));
  if (algo_ == LinearAlgo::gemm_t) {  // mc_: features per task, nc_: input rows per task
    // Split the input rows among the threads first: each task packs its rows
    // once, while a split of the features would pack them again per block.
    nc_ = std::min(std::max<int64_t>(nr, round_up(ceil_div(M, threads_), nr)), int64_t{8} * nr);
    const int64_t row_blocks = ceil_div(M, nc_);
    mc_ = round_up(N, mr);
    if (row_blocks < threads_) mc_ = std::max<int64_t>(mr, round_up(ceil_div(N, ceil_div(threads_, row_blocks)), mr));
    workspace_ = threads_ * (kc_ * nc_ + mc_ * nc_) * static_cast<int64_t>(sizeof(T));
    return;
  }
  // Blocks of microtiles, tm x tn each (at most 16 rows of tiles, B's block
  // within 256 KB), that the threads share most evenly: the busiest thread's
  // outputs, padding included, fewest; then the fewest blocks. Of the
  // tile shapes the one whose busiest thread computes least, on a tie the
  // first (64 x 4096 -> 128 on one thread: 8x32 tiles 590 us, 8x48 with
  // the last 32 columns on 12x32 615 us; blocks of one tile row and all
  // columns would leave one of two threads idle there). Contiguous input rows are read in place, so a narrower
  // block costs no packing.
  auto split = [&](const GemmUkernel<T>& u, int64_t& mc, int64_t& nc) {
    const int64_t Tm = ceil_div(std::max<int64_t>(M, 1), u.mr), Tn = ceil_div(N, u.nr);
    const int64_t tn_max =
        std::max<int64_t>(1, std::min(Tn, 256 * 1024 / (kc_ * static_cast<int64_t>(sizeof(T)) * u.nr)));
    int64_t best = std::numeric_limits<int64_t>::max(), best_blocks = 0;
    for (int64_t tm = 1; tm <= std::min<int64_t>(Tm, 16); ++tm)
      for (int64_t tn = 1; tn <= tn_max; ++tn) {
        const int64_t blocks = ceil_div(Tm, tm) * ceil_div(Tn, tn);
        const int64_t load = ceil_div(blocks, threads_) * tm * tn * u.mr * u.nr;
        if (load < best || (load == best && blocks < best_blocks))
          best = load, best_blocks = blocks, mc = tm * u.mr, nc = tn * u.nr;
      }
    return best;
  };
  const UkernelTable& t = *table_;
  int64_t load = split(t.gemm<T>(0), mc_, nc_);
  for (int shape = 1; shape < kGemmShapes; ++shape) {
    int64_t mc = 0, nc = 0;
    const int64_t l = split(t.gemm<T>(shape), mc, nc);
    if (l < load) uk_ = t.gemm<T>(shape), mc_ = mc, nc_ = nc, load = l;
  }
  edge_ = N;
  // Or the wide tiles' whole panels, the last columns on one panel of
  // another shape, in blocks of a panel and a thread's share of the rows
  // (each panel then streams once per block), taken as the threads free up.
  const GemmUkernel<T>& w = t.gemm<T>(0);
  for (int shape = 1; shape < kGemmShapes; ++shape) {
    const GemmUkernel<T>& e = t.gemm<T>(shape);
    if (N <= w.nr || N % w.nr == 0 || N % w.nr > e.nr) continue;
    const int64_t n0 = N / w.nr * w.nr;
    const int64_t mc0 = std::min<int64_t>(16, ceil_div(ceil_div(M, w.mr), threads_)) * w.mr;
    const int64_t mc1 = std::min<int64_t>(16, ceil_div(ceil_div(M, e.mr), threads_)) * e.mr;
    std::vector<int64_t> busy(static_cast<size_t>(threads_), 0);  // each thread takes the next block when free
    auto take = [&](int64_t outputs) { *std::min_element(busy.begin(), busy.end()) += outputs; };
    for (int64_t i0 = 0; i0 < M; i0 += mc0)
      for (int64_t j = 0; j < n0; j += w.nr) take(round_up(std::min(mc0, M - i0), w.mr) * w.nr);
    for (int64_t i0 = 0; i0 < M; i0 += mc1) take(round_up(std::min(mc1, M - i0), e.mr) * e.nr);
    const int64_t mixed = *std::max_element(busy.begin(), busy.end());
    if (mixed < load) uk_ = w, edge_uk_ = e, edge_ = n0, mc_ = mc0, nc_ = w.nr, edge_mc_ = mc1, load = mixed;
  }
  predicted_s_ = 2.0 * load * K / rate + (threads_ > 1 ? model.wake_s : 0);
  workspace_ = threads_ * std::max(round_up(mc_, uk_.mr), edge_ < N ? round_up(edge_mc_, edge_uk_.mr) : 0) * kc_ *
               static_cast<int64_t>(sizeof(T));
}

template <class T>
PackedLinearWeights<T> LinearPlan<T>::pack(const TensorView& w, const TensorView* b) const {
  const int64_t K = d_.K, N = d_.N;
  LK_CHECK(w.ndim == 2 && w.shape[0] == N && w.shape[1] == K, "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (b != nullptr), "bias: does not match the plan");
  PackedLinearWeights<T> p;
  const int layout = weight_layout();  // 0: rows, as dot and gemm_t read them
  const int nr = algo_ == LinearAlgo::gemm ? uk_.nr : layout;
  const int64_t n0 = algo_ == LinearAlgo::gemm ? edge_ : N;  // the edge's columns go in its panels
  const int64_t Np = nr ? round_up(n0, nr) + (n0 < N ? round_up(N - n0, edge_uk_.nr) : 0) : N;
  p.w = aligned_alloc_array<T>(Np * K);
  if (nr) {
    pack_b_panels(w.ptr<T>(), w.strides[1], w.strides[0], K, n0, nr, p.w.get());  // B(k, j) = W[j][k]
    if (n0 < N)
      pack_b_panels(w.ptr<T>() + n0 * w.strides[0], w.strides[1], w.strides[0], K, N - n0, edge_uk_.nr,
                    p.w.get() + n0 * K);
    p.nr = layout;
  } else {
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) p.w[j * K + k] = w.ptr<T>()[j * w.strides[0] + k * w.strides[1]];
  }
  if (b != nullptr) {
    p.bias = aligned_alloc_array<T>(Np);
    for (int64_t j = 0; j < Np; ++j) p.bias[j] = j < N ? b->ptr<T>()[j * b->strides[0]] : T(0);
  }
  return p;
}

template <class T>
typename LinearPlan<T>::Weights LinearPlan<T>::bind(const PackedLinearWeights<T>& p) const {
  LK_CHECK(p.nr == weight_layout(), "weight: packed for another plan");
  LK_CHECK(d_.has_bias == (p.bias != nullptr), "bias: does not match the plan");
  return {p.w.get(), d_.K, p.bias.get()};
}

template <class T>
typename LinearPlan<T>::Weights LinearPlan<T>::bind(const TensorView* w, const TensorView* b,
                                                    BoundStorage& storage) const {
  LK_CHECK(w != nullptr && w->ndim == 2 && w->shape[0] == d_.N && w->shape[1] == d_.K,
           "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (b != nullptr), "bias: does not match the plan");
  // Rows in place need a real row stride: the GEMM takes a stride of 0 for packed panels.
  if (weight_layout() == 0 && w->strides[1] == 1 && w->strides[0] != 0 && (b == nullptr || b->strides[0] == 1))
    return {w->ptr<T>(), w->strides[0], b ? b->ptr<T>() : nullptr};
  storage.packed = pack(*w, b);
  return bind(storage.packed);
}

template <class T>
void LinearPlan<T>::run(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  LK_CHECK(x.ndim == 2 && x.shape[0] == M && x.shape[1] == K, "input: shape does not match the plan");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: the bias alone
    const bool relu = d_.act == Activation::relu;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const T v = wt.bias ? wt.bias[j] : T(0);
        y[i * N + j] = relu && v < T(0) ? T(0) : v;
      }
    return;
  }
  if (algo_ == LinearAlgo::dot)
    run_dot(x, wt, y);
  else if (algo_ == LinearAlgo::gemv)
    run_gemv(x, wt, y);
  else if (algo_ == LinearAlgo::gemm_t)
    run_gemm_t(x, wt, y);
  else
    run_gemm(x, wt, y);
}

template <class T>
void LinearPlan<T>::run_dot(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  constexpr int64_t kRows = 4;  // input rows the dot kernel takes at once
  const int64_t nblocks = ceil_div(N, nc_), mblocks = ceil_div(M, kRows);
  const bool relu = d_.act == Activation::relu;
  const bool x_rows = x.strides[1] == 1;
  parallel_for(mblocks * nblocks, threads_, [&](int64_t task) {
    const int64_t i0 = (task / nblocks) * kRows, rows = std::min(kRows, M - i0);
    const int64_t j0 = (task % nblocks) * nc_, n = std::min(nc_, N - j0);
    const T* xi = x.ptr<T>() + i0 * x.strides[0];
    int64_t ldx = x.strides[0];
    if (!x_rows) {  // the kernel wants contiguous rows
      T* copy = scratch_array<T>(kPackSlot, static_cast<size_t>(rows * K));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t p = 0; p < K; ++p) copy[r * K + p] = xi[r * x.strides[0] + p * x.strides[1]];
      xi = copy;
      ldx = K;
    }
    dot_.fn(K, xi, ldx, static_cast<int>(rows), wt.w + j0 * wt.ldw, wt.ldw, n, y + i0 * N + j0, N,
            wt.bias ? wt.bias + j0 : nullptr, relu);
  });
}

template <class T>
void LinearPlan<T>::run_gemv(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  const T* xr = x.ptr<T>();
  int64_t ldx = x.strides[0];
  if (x.strides[1] != 1) {  // the kernel wants contiguous rows
    T* copy = scratch_array<T>(kPackSlot, static_cast<size_t>(M * K));
    for (int64_t r = 0; r < M; ++r)
      for (int64_t p = 0; p < K; ++p) copy[r * K + p] = xr[r * x.strides[0] + p * x.strides[1]];
    xr = copy;
    ldx = K;
  }
  const bool relu = d_.act == Activation::relu;
  // Each call reads a thread's panels in the order opposite to the call
  // before: the panels that call read last, still in the core's L2, come
  // first. In one order, a share of the weight past L2 evicts each line
  // shortly before it is read again. Every output's sum is the same.
  const bool backward = gemv_calls_.fetch_add(1, std::memory_order_relaxed) & 1;
  parallel_for(ceil_div(N, nc_), threads_, [&](int64_t task) {
    const int64_t j0 = task * nc_, n = std::min(nc_, N - j0);
    dot_.gemv(K, xr, ldx, static_cast<int>(M), wt.w + j0 * K, n, y + j0, N, wt.bias ? wt.bias + j0 : nullptr, relu,
              backward);
  });
}

template <class T>
void LinearPlan<T>::run_gemm_t(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  const int nr = uk_.nr;
  const int64_t fblocks = ceil_div(N, mc_), rblocks = ceil_div(M, nc_);
  const bool relu = d_.act == Activation::relu;
  const T* xp = x.ptr<T>();
  parallel_for(fblocks * rblocks, threads_, [&](int64_t task) {
    const int64_t i0 = (task % fblocks) * mc_, m = std::min(mc_, N - i0);  // features
    const int64_t j0 = (task / fblocks) * nc_, n = std::min(nc_, M - j0);  // input rows
    const int64_t ldt = round_up(n, nr);
    T* B = scratch_array<T>(kPackSlot, static_cast<size_t>(kc_ * ldt));
    T* tile = scratch_array<T>(kTileSlot, static_cast<size_t>(m * ldt));  // features x rows
    for (int64_t pc = 0; pc < K; pc += kc_) {
      const int64_t kc = std::min(kc_, K - pc);
      // B(k, j) = x[j0 + j][pc + k]
      pack_b_panels(xp + j0 * x.strides[0] + pc * x.strides[1], x.strides[1], x.strides[0], kc, n, nr, B);
      GemmEpilogue<T> ep;
      ep.bias = (pc == 0 && wt.bias) ? wt.bias + i0 : nullptr;
      ep.bias_per_row = true;
      ep.accumulate = pc > 0;
      ep.relu = relu && pc + kc == K;
      macro_kernel(uk_, m, n, kc, wt.w + i0 * wt.ldw + pc, int64_t{0}, wt.ldw, B, kc * nr, tile, ldt, ep);
    }
    store_transposed(tile, ldt, m, n, y + j0 * N + i0, N);
  });
}

template <class T>
void LinearPlan<T>::run_gemm(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t M = d_.M, K = d_.K, N = d_.N;
  const int nr = uk_.nr;
  const int64_t mblocks = ceil_div(M, mc_), nblocks = ceil_div(edge_, nc_);
  const bool relu = d_.act == Activation::relu;
  const T* xp = x.ptr<T>();
  const int64_t edge_blocks = edge_ < N ? ceil_div(M, edge_mc_) : 0;
  parallel_for(mblocks * nblocks + edge_blocks, threads_, [&](int64_t task) {
    const bool edge = task >= mblocks * nblocks;  // rows of the edge's columns
    const GemmUkernel<T>& uk = edge ? edge_uk_ : uk_;
    const int64_t nb = task % nblocks, mb = task / nblocks;
    const int64_t i0 = edge ? (task - mblocks * nblocks) * edge_mc_ : mb * mc_;
    const int64_t m = std::min(edge ? edge_mc_ : mc_, M - i0);
    const int64_t j0 = edge ? edge_ : nb * nc_, n = edge ? N - edge_ : std::min(nc_, edge_ - j0);
    const T* panels = edge ? wt.w + edge_ * K : wt.w + (j0 / nr) * K * nr;
    // Contiguous input rows are read in place (the microkernel broadcasts
    // along them): packing them would cost as much again per column block.
    const bool in_place = x.strides[1] == 1 && x.strides[0] != 0;
    T* A = in_place ? nullptr : scratch_array<T>(kPackSlot, static_cast<size_t>(round_up(m, uk.mr) * kc_));
    for (int64_t pc = 0; pc < K; pc += kc_) {
      const int64_t kc = std::min(kc_, K - pc);
      const T* a = xp + i0 * x.strides[0] + pc * x.strides[1];
      if (!in_place) pack_a_panels(a, x.strides[0], x.strides[1], m, kc, uk.mr, A);
      GemmEpilogue<T> ep;
      ep.bias = (pc == 0 && wt.bias) ? wt.bias + j0 : nullptr;
      ep.bias_per_row = false;
      ep.accumulate = pc > 0;
      ep.relu = relu && pc + kc == K;
      macro_kernel(uk, m, n, kc, in_place ? a : A, kc * uk.mr, in_place ? x.strides[0] : 0, panels + pc * uk.nr,
                   K * uk.nr, y + i0 * N + j0, N, ep);
    }
  });
}

template <class T>
std::string LinearPlan<T>::describe() const {
  std::string s = cat("linear ", dtype_name(dtype_of<T>()));
  if (algo_ == LinearAlgo::dot)
    s += cat(" algo=dot ukernel=", dot_.name, " nc=", nc_);
  else if (algo_ == LinearAlgo::gemv)
    s += cat(" algo=gemv ukernel=", dot_.gemv_name, " nc=", nc_);
  else if (algo_ == LinearAlgo::gemm_t)
    s += cat(" algo=gemm_t ukernel=", uk_.name, " kc=", kc_, " mc=", mc_, " nc=", nc_);
  else
    s += cat(" algo=gemm ukernel=", uk_.name, " kc=", kc_, " mc=", mc_, " nc=", nc_,
             edge_ < d_.N ? cat(" columns_from=", edge_, " ukernel=", edge_uk_.name) : "");
  return s + cat(" threads=", threads_, " predicted_us=", predicted_s_ * 1e6, " workspace_bytes=", workspace_);
}

template class LinearPlan<float>;
template class LinearPlan<double>;

}  // namespace lk::cpu
