#include "cpu/conv2d.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "core/settings.h"
#include "core/thread_pool.h"
#include "cpu/conv_direct.h"
#include "cpu/gemm.h"
#include "cpu/machine.h"

namespace lk::cpu {

const char* conv_algo_name(ConvAlgo a) {
  switch (a) {
    case ConvAlgo::direct: return "direct";
    case ConvAlgo::im2col_gemm: return "im2col_gemm";
    case ConvAlgo::implicit_gemm_t: return "implicit_gemm_t";
    case ConvAlgo::indirect_gemm: return "indirect_gemm";
    default: return "implicit_gemm";
  }
}

ConvAlgo conv_algo_from(const std::string& name) {
  for (ConvAlgo a : {ConvAlgo::implicit_gemm, ConvAlgo::im2col_gemm, ConvAlgo::implicit_gemm_t,
                     ConvAlgo::indirect_gemm, ConvAlgo::direct})
    if (name == conv_algo_name(a)) return a;
  throw std::invalid_argument(cat("algorithm: expected 'auto', 'implicit_gemm', 'im2col_gemm', 'implicit_gemm_t', ",
                                  "'indirect_gemm' or 'direct', got '", name, "'"));
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
  // Sizes come from arrays that exist, but padding and strides do not: the
  // output must be addressable before anything is computed in int64.
  const double out_bytes = static_cast<double>(d.N) * d.K * d.P() * d.Q() * 8.0;
  if (out_bytes > 4e18) throw std::overflow_error("input: the output is too large to address");
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

// The cost model. Predicted time of a candidate: compute on the padded
// tiles at the microkernel's measured rate (less a per-call overhead that
// matters for short reductions), spread over the threads with the imbalance
// of whole tasks; memory traffic at the measured bandwidth when it exceeds
// that; packing; and waking the pool. Constants below are the model's, not
// measurements, and say which way each effect goes.
namespace {

constexpr double kUkernelCallOverheadK = 8;    // a microkernel call costs ~8 extra steps of its k loop
constexpr double kL1Bytes = 48 << 10;          // per core
constexpr double kL1MissEfficiency = 0.85;     // when a B micro-panel stays in neither L1 nor L2
constexpr double kL2PanelEfficiency = 0.97;    // when it streams from L2
constexpr double kAccumulateFromL2K = 16;      // a K block's pass over a C tile in L2, in k steps per call
constexpr double kTileFromL3 = 1.6;            // the transposed store of a tile past L2, against one within
constexpr double kPackSecondsPerElem = 0.4e-9;  // im2col gather, per element, one thread
constexpr double kCopyPerPack = 0.4;             // a row copy (indirect_gemm's band) against a gather
constexpr double kDirectEfficiency = 0.15;     // the direct loop against the GEMM microkernel's rate
// conv_group_planes against the microkernel's rate (64 -> 64 on 56x56 in 4
// groups: 0.79; at stride 2, with the band's phases: 0.5)
constexpr double kGroupPlanesEfficiency = 0.6;
constexpr double kTaskSeconds = 0.1e-6;        // bookkeeping per task
constexpr double kL2Bytes = 1 << 20;           // per core
// Threads do not start a job together: a worker joins late (woken, or
// preempted by another process) and tasks end at uneven times. Tasks are
// handed out one at a time, so what a late thread costs is about half a task
// of idle time at the end: a job cut into a single task per thread can run
// at the speed of one thread, a job cut into many cannot.
constexpr double kStragglerTasks = 0.5;

struct ConvShape {
  int64_t N, G, Kg, CRS, PQ, in_bytes, out_bytes, weight_bytes;
  int64_t padded_elems;  // N*C*(H+pads)*(W+pads) when there is padding, else 0
  int64_t Q, tap_rows;   // output row length; input rows one output row's taps span
  int64_t row_step;      // input rows between output rows
  int64_t taps;          // R*S
};

template <class T>
ConvShape shape_of(const Conv2dDesc& d) {
  const int64_t e = sizeof(T);
  const bool pad = d.pad_top || d.pad_bottom || d.pad_left || d.pad_right;
  return {d.N, d.groups, d.Kg(), d.Cg() * d.R * d.S, d.P() * d.Q(), d.N * d.C * d.H * d.W * e,
          d.N * d.K * d.P() * d.Q() * e, d.K * d.Cg() * d.R * d.S * e,
          pad ? d.N * d.C * (d.H + d.pad_top + d.pad_bottom) * (d.W + d.pad_left + d.pad_right) : 0,
          d.Q(), (d.R - 1) * d.dil_h + 1, d.stride_h, d.R * d.S};
}

double imbalance(int64_t tasks, int threads) {
  return static_cast<double>(ceil_div(tasks, threads)) * threads / static_cast<double>(tasks);
}

// The end of a parallel loop: the idle time that late starts and uneven task
// ends leave, given the time of one task on one thread.
double straggle(double task_s, int threads) { return threads > 1 ? kStragglerTasks * task_s : 0.0; }

// Padded extent of n items cut into blocks of b, each rounded up to r.
int64_t padded(int64_t n, int64_t b, int64_t r) { return (n / b) * round_up(b, r) + round_up(n % b, r); }

template <class T>
void predict_gemm(ConvChoice& c, const ConvShape& s, const GemmUkernel<T>& uk, const MachineModel& m,
                  double lambda, bool prepacked) {
  // Rows of the GEMM: channels (pixels when transposed), in blocks of mc;
  // columns: pixels (channels), in blocks of nc.
  const bool indirect = c.algo == ConvAlgo::indirect_gemm;
  const bool t = c.algo == ConvAlgo::implicit_gemm_t || indirect;
  const int64_t M = t ? s.PQ : s.Kg, Ncols = t ? s.Kg : s.PQ;
  const int64_t jblocks = ceil_div(Ncols, c.nc), mblocks = ceil_div(M, c.mc);
  const int64_t tasks = s.N * s.G * jblocks * mblocks;
  const int64_t rows = padded(M, c.mc, uk.mr), cols = padded(Ncols, c.nc, uk.nr);
  const double kblocks = static_cast<double>(ceil_div(s.CRS, c.kc));
  // Every K block after the first reads the C tile back and writes it again,
  // from L2 once the tile outgrows L1.
  const double tile_bytes = static_cast<double>(round_up(c.mc, uk.mr) * round_up(c.nc, uk.nr)) * sizeof(T);
  const double pass_k = kUkernelCallOverheadK + (tile_bytes > kL1Bytes ? kAccumulateFromL2K : 0.0);
  const double eff_k = static_cast<double>(s.CRS) / (s.CRS + kUkernelCallOverheadK + (kblocks - 1) * pass_k);
  // The microkernel streams a B micro-panel (kc x NR) per A panel: best
  // from L1, nearly as well from L2.
  const double b_panel = c.kc * uk.nr * static_cast<double>(sizeof(T));
  const double l1 = b_panel <= kL1Bytes * 0.6 ? 1.0 : b_panel <= kL2Bytes ? kL2PanelEfficiency : kL1MissEfficiency;
  const double flops = 2.0 * s.N * s.G * rows * cols * s.CRS;
  const double rate = m.gemm_flops[sizeof(T) == 8][c.shape] * eff_k * l1;
  const double compute = flops / rate / c.threads * imbalance(tasks, c.threads) +
                         straggle(flops / rate / static_cast<double>(tasks), c.threads);
  // im2col gathers: once per image (im2col_gemm) or once per block of the
  // other operand; the transposed GEMM also packs weights unless a layer did.
  const double repacks = c.algo == ConvAlgo::im2col_gemm ? 1 : t ? jblocks : mblocks;
  double packs = static_cast<double>(s.N) * s.G * s.CRS * s.PQ * repacks;
  if (indirect) {  // no im2col; with padding, each task copies its band of the input (and a halo)
    const double band_rows = std::max(1.0, static_cast<double>(c.mc) / s.Q) * s.row_step;
    packs = s.padded_elems * jblocks * (1.0 + (s.tap_rows - 1) / band_rows) * kCopyPerPack;
  }
  const double weight_pack = t && !prepacked ? s.weight_bytes / sizeof(T) * kPackSecondsPerElem * 2 : 0;
  // Transposed GEMMs store their tile into channel planes in one more pass,
  // reading it back from L3 when it outgrows half of L2.
  const double transposes = t ? static_cast<double>(s.N) * s.G * s.Kg * s.PQ * kCopyPerPack *
                                    (tile_bytes > kL2Bytes / 2 ? kTileFromL3 : 1.0)
                              : 0.0;
  const double pack = (packs + transposes) * kPackSecondsPerElem / c.threads + weight_pack;
  // Weights stream again for every pixel block once they outgrow the cache.
  const double weight_reads = s.weight_bytes > (1 << 20) ? static_cast<double>(s.N) * (t ? mblocks : jblocks) : 1.0;
  const double bytes = s.in_bytes + s.out_bytes + s.weight_bytes * weight_reads +
                       (c.algo == ConvAlgo::im2col_gemm ? 2.0 * packs * sizeof(T) : 0.0);
  const double memory = bytes / (m.bandwidth * std::min(c.threads, 2));
  // A B block past half of L2 streams its panels from L3. indirect_gemm
  // packs no block: its A is the input itself, where mc pixels times kc taps
  // touch about mc elements per channel.
  const double block = indirect ? static_cast<double>(c.kc) / s.taps * (c.mc + s.tap_rows * s.Q)
                       : t      ? c.kc * round_up(c.mc, uk.mr)
                                : c.kc * round_up(c.nc, uk.nr);
  const double spill = block * sizeof(T) > kL2Bytes / 2 ? 1.15 : 1.0;
  // im2col_gemm runs two parallel loops per image, implicit_gemm one in all.
  const double wakes = c.algo == ConvAlgo::im2col_gemm ? 2.0 * s.N : 1.0;
  c.time_s = std::max(compute * spill, memory) + pack + tasks * kTaskSeconds / c.threads +
             (c.threads > 1 ? wakes * m.wake_s : 0);
  const int64_t e = sizeof(T);
  if (c.algo == ConvAlgo::im2col_gemm)
    c.workspace = s.G * s.CRS * round_up(s.PQ, uk.nr) * e;
  else if (t)  // per thread an A block of pixels (a band: indirect), plus the weights if packed per run
    c.workspace = c.threads * (indirect ? (s.padded_elems ? s.padded_elems / s.N : 0) : c.kc * round_up(c.mc, uk.mr)) * e +
                  (prepacked ? 0 : s.G * round_up(s.Kg, uk.nr) * s.CRS * e);
  else
    c.workspace = c.threads * c.kc * round_up(c.nc, uk.nr) * e;
  c.cost = c.time_s + lambda * static_cast<double>(c.workspace);
}

// Groups of several channels and filters on float: each group's GEMM is
// small (4 groups of 16 -> 16: 16 filters against patches of 144), so
// packing its patches costs as much as multiplying them, and the direct loop
// for depthwise layers reads each input vector for one filter only. The
// direct kernel's planes path instead loads each input vector once per tap
// for a block of 8 (or 4) filters, from a band of the group's rows (Kg a
// multiple of 4). Its loads take consecutive columns: at a column stride S
// up to 4 the band holds each plane's columns in S phase planes.
template <class T>
bool conv_group_planes(const Conv2dDesc& d) {
  return std::is_same_v<T, float> && d.groups > 1 && d.Cg() > 1 && d.Kg() % 4 == 0 && d.stride_w <= 4;
}

template <class T>
std::vector<ConvChoice> conv_candidates(const Conv2dDesc& d, const UkernelTable& table, bool prepacked,
                                       ConvRestrict only) {
  const MachineModel& m = machine_model();
  const SchedulerSettings settings = scheduler_settings();
  const ConvShape s = shape_of<T>(d);
  const int pool = get_num_threads();
  std::vector<int> thread_counts{1};
  if (pool > 1) thread_counts.push_back(pool);
  std::vector<ConvChoice> out;

  for (int threads : thread_counts) {
    ConvChoice c;
    c.algo = ConvAlgo::direct;
    c.threads = threads;
    const double flops = 2.0 * s.N * s.G * s.Kg * s.CRS * s.PQ;
    const int64_t tasks = std::max<int64_t>(1, s.N * s.G * s.Kg);
    const double serial =
        flops / (m.gemm_flops[sizeof(T) == 8][0] * (conv_group_planes<T>(d) ? kGroupPlanesEfficiency : kDirectEfficiency));
    c.time_s = serial / threads * imbalance(tasks, threads) + straggle(serial / static_cast<double>(tasks), threads) +
               (threads > 1 ? m.wake_s : 0);
    // No workspace: like the depthwise loop's band of one channel, the group
    // planes' band (at most 128 KB a thread) is the threads' own scratch.
    c.cost = c.time_s;
    out.push_back(c);
  }

  // K blocks: the whole reduction in one pass while it is short; otherwise
  // near-equal blocks of at most 512 (or 256) rows, so B blocks stay in L2.
  // The whole reduction in one block is a candidate at any length: no tile
  // of C goes back and forth between passes (measured: ResNet-18's 3x3
  // layers, C*R*S up to 4608, ran fastest that way on the transposed GEMMs).
  std::vector<int64_t> kcs{s.CRS};
  for (int64_t cap : {int64_t{768}, int64_t{256}, int64_t{128}}) {
    const int64_t kc = s.CRS <= cap ? s.CRS : ceil_div(s.CRS, ceil_div(s.CRS, cap == 768 ? 512 : cap));
    if (std::find(kcs.begin(), kcs.end(), kc) == kcs.end()) kcs.push_back(kc);
  }
  for (int shape = 0; shape < kGemmShapes; ++shape)
  for (ConvAlgo algo :
       {ConvAlgo::implicit_gemm, ConvAlgo::im2col_gemm, ConvAlgo::implicit_gemm_t, ConvAlgo::indirect_gemm}) {
    // im2col_gemm holds the whole image's im2col matrix (C*R*S times the
    // input): never a default, only on a caller's explicit request.
    if (algo == ConvAlgo::im2col_gemm && only.algo != ConvAlgo::im2col_gemm) continue;
    const GemmUkernel<T>& uk = table.gemm<T>(shape);
    const bool t = algo == ConvAlgo::implicit_gemm_t || algo == ConvAlgo::indirect_gemm;
    const int64_t M = t ? s.PQ : s.Kg, max_nc = round_up(t ? s.Kg : s.PQ, uk.nr);
    for (int threads : thread_counts) {
      for (int64_t kc : kcs) {
        for (int64_t panels = 1;; panels *= 2) {
          const int64_t nc = std::min(max_nc, panels * uk.nr);
          for (int64_t split = 1; split <= 64; split *= 2) {
            const int64_t mc = round_up(ceil_div(M, split), uk.mr);
            if (split > 1 && mc * (split - 1) >= M) break;  // no more distinct splits
            ConvChoice c;
            c.algo = algo;
            c.kc = kc, c.nc = nc, c.mc = mc, c.shape = shape, c.threads = threads;
            predict_gemm(c, s, uk, m, settings.memory_weight, prepacked);
            out.push_back(c);
          }
          if (nc == max_nc) break;
        }
      }
    }
  }
  out.erase(std::remove_if(out.begin(), out.end(),
                           [&](const ConvChoice& c) {
                             return (only.algo && c.algo != *only.algo) ||
                                    (only.shape && c.algo != ConvAlgo::direct && c.shape != *only.shape);
                           }),
            out.end());
  std::vector<ConvChoice> fit;
  for (const auto& c : out)
    if (c.workspace <= settings.memory_budget) fit.push_back(c);
  if (fit.empty()) {  // nothing fits the budget: the smallest workspace wins
    auto smallest = *std::min_element(out.begin(), out.end(), [](const ConvChoice& a, const ConvChoice& b) {
      return a.workspace < b.workspace || (a.workspace == b.workspace && a.cost < b.cost);
    });
    fit.push_back(smallest);
  }
  std::stable_sort(fit.begin(), fit.end(), [](const ConvChoice& a, const ConvChoice& b) { return a.cost < b.cost; });
  return fit;
}

}  // namespace

template <class T>
Conv2dPlan<T>::Conv2dPlan(const Conv2dDesc& desc, bool prepacked, const ConvChoice* forced,
                          ConvRestrict only)
    : d_(desc), table_(&ukernels()), uk_(table_->gemm<T>()), prepacked_(prepacked), only_(only) {
  validate(d_);
  const std::vector<ConvChoice> all = candidates();
  choice_ = all.front();
  if (forced) {
    choice_ = *forced;
    for (const ConvChoice& c : all)  // keep the model's prediction for the record
      if (c.algo == forced->algo && c.kc == forced->kc && c.mc == forced->mc && c.nc == forced->nc &&
          c.shape == forced->shape && c.threads == forced->threads)
        choice_ = c;
    measured_ = true;
  }
  LK_CHECK(choice_.shape >= 0 && choice_.shape < kGemmShapes, "plan: invalid microkernel shape");
  uk_ = table_->gemm<T>(choice_.shape);
  algo_ = choice_.algo;
  kc_ = choice_.kc, mc_ = choice_.mc, nc_ = choice_.nc;
  threads_ = std::clamp(choice_.threads, 1, get_num_threads());
  if (algo_ != ConvAlgo::direct)
    LK_CHECK(kc_ > 0 && mc_ > 0 && nc_ > 0 && nc_ % uk_.nr == 0 && mc_ % uk_.mr == 0, "plan: invalid blocking");
  group_planes_ = algo_ == ConvAlgo::direct && conv_group_planes<T>(d_);
  if (group_planes_) {
    // Bands of output rows: a group's input rows for them within 128 KB of
    // L2, and a few tasks per thread.
    const int64_t P = d_.P(), Cg = d_.Cg();
    auto rows_in = [&](int64_t rows) { return (rows - 1) * d_.stride_h + (d_.R - 1) * d_.dil_h + 1; };
    // A phase plane's row: every column a tap of the last output reads.
    const int64_t sw = d_.stride_w;
    band_width_ = std::max(ceil_div(d_.pad_left + d_.W + d_.pad_right, sw), d_.Q() + (d_.S - 1) * d_.dil_w / sw);
    rows_per_band_ = P;
    while (rows_per_band_ > 1 && (Cg * sw * rows_in(rows_per_band_) * band_width_ * 4 > (128 << 10) ||
                                  d_.N * d_.groups * ceil_div(P, rows_per_band_) < 4 * threads_))
      rows_per_band_ = ceil_div(rows_per_band_, 2);
    band_rows_ = rows_in(rows_per_band_);
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t r = 0; r < d_.R; ++r)
        for (int64_t s = 0; s < d_.S; ++s)
          tap_off_.push_back(((c * sw + s * d_.dil_w % sw) * band_rows_ + r * d_.dil_h) * band_width_ +
                             s * d_.dil_w / sw);
  }
}

template <class T>
std::vector<ConvChoice> Conv2dPlan<T>::candidates() const {
  return conv_candidates<T>(d_, *table_, prepacked_, only_);
}

template <class T>
PackedConvWeights<T> Conv2dPlan<T>::pack(const TensorView& w, const TensorView* bias) const {
  const int64_t K = d_.K, Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S;
  LK_CHECK(w.ndim == 4 && w.shape[0] == K && w.shape[1] == d_.Cg() && w.shape[2] == d_.R && w.shape[3] == d_.S,
           "weight: shape does not match the plan");
  LK_CHECK(d_.has_bias == (bias != nullptr), "bias: does not match the plan");
  PackedConvWeights<T> p;
  p.layout = weight_layout();
  auto flat = aligned_alloc_array<T>(K * CRS);
  flatten_weight(w, flat.get());
  if (group_planes_) {  // per group taps x Kg
    p.w = aligned_alloc_array<T>(K * CRS);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < CRS; ++t) p.w[(k / Kg * CRS + t) * Kg + k % Kg] = flat[k * CRS + t];
  } else if (algo_ == ConvAlgo::direct) {
    p.w = std::move(flat);
  } else if (transposed()) {
    const int64_t group_stride = round_up(Kg, uk_.nr) * CRS;
    p.w = aligned_alloc_array<T>(d_.groups * group_stride);
    for (int64_t g = 0; g < d_.groups; ++g)  // B(crs, k) = W[g*Kg + k][crs]
      pack_b_panels(flat.get() + g * Kg * CRS, int64_t{1}, CRS, CRS, Kg, uk_.nr, p.w.get() + g * group_stride);
  } else {
    const int64_t group_stride = round_up(Kg, uk_.mr) * CRS;
    p.w = aligned_alloc_array<T>(d_.groups * group_stride);
    for (int64_t g = 0; g < d_.groups; ++g)
      pack_a_panels(flat.get() + g * Kg * CRS, CRS, int64_t{1}, Kg, CRS, uk_.mr, p.w.get() + g * group_stride);
  }
  if (bias) {
    // The transposed GEMM reads a per-column bias a whole panel at a time.
    const int64_t padded = K + uk_.nr;
    p.bias = aligned_alloc_array<T>(padded);
    for (int64_t k = 0; k < padded; ++k) p.bias[k] = k < K ? bias->ptr<T>()[k * bias->strides[0]] : T(0);
  }
  return p;
}

template <class T>
typename Conv2dPlan<T>::Weights Conv2dPlan<T>::bind(const PackedConvWeights<T>& p) const {
  LK_CHECK(p.layout == weight_layout(), "weight: packed for another plan");
  LK_CHECK(d_.has_bias == (p.bias != nullptr), "bias: does not match the plan");
  return {p.w.get(), algo_ == ConvAlgo::direct ? d_.Cg() * d_.R * d_.S : 0, p.bias.get()};
}

template <class T>
typename Conv2dPlan<T>::Weights Conv2dPlan<T>::bind(const TensorView* w, const TensorView* b,
                                                    BoundStorage& storage) const {
  if (group_planes_) {  // per group taps x Kg, in the calling thread's scratch
    const Weights rows = bind_rows(d_, w, b, storage);
    const int64_t K = d_.K, Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S;
    T* packed = scratch_array<T>(kWeightSlot, static_cast<size_t>(K * CRS));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < CRS; ++t) packed[(k / Kg * CRS + t) * Kg + k % Kg] = rows.w[k * CRS + t];
    return {packed, 0, rows.bias};
  }
  if (!transposed()) return bind_rows(d_, w, b, storage);
  // Panels of W^T for this run, packed into the calling thread's scratch
  // (reused across calls: no allocation, no fresh pages) from rows.
  const Weights rows = bind_rows(d_, w, b, storage);
  const int64_t K = d_.K, Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S, nr = uk_.nr;
  const int64_t group_stride = round_up(Kg, nr) * CRS;
  T* panels = scratch_array<T>(kWeightSlot, static_cast<size_t>(d_.groups * group_stride + K + nr));
  for (int64_t g = 0; g < d_.groups; ++g)  // B(crs, k) = W[g*Kg + k][crs]
    pack_b_panels(rows.w + g * Kg * CRS, int64_t{1}, CRS, CRS, Kg, static_cast<int>(nr), panels + g * group_stride);
  T* bias = nullptr;
  if (rows.bias) {  // read a whole panel at a time: padded
    bias = panels + d_.groups * group_stride;
    std::copy(rows.bias, rows.bias + K, bias);
    std::fill(bias + K, bias + K + nr, T(0));
  }
  return {panels, 0, bias};
}

template <class T>
typename Conv2dPlan<T>::Weights Conv2dPlan<T>::bind_rows(const Conv2dDesc& d_, const TensorView* w,
                                                         const TensorView* b, BoundStorage& storage) {
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

  if (group_planes_) {
    const int64_t bands = ceil_div(P, rows_per_band_);
    parallel_for(d_.N * G * bands, threads_, [&](int64_t task) {
      const int64_t n = task / (G * bands), g = task / bands % G, r0 = task % bands * rows_per_band_;
      group_planes_rows(x, wt, n, g, r0, std::min(P, r0 + rows_per_band_), y + (n * K + g * Kg) * PQ + r0 * d_.Q(),
                        PQ);
    });
    return;
  }
  if (algo_ == ConvAlgo::direct) {
    // Runs of channels: a few tasks per thread for balance, each one call of
    // the microkernel; whole vectors of channels where they go in the lanes
    // (DwconvJob::hwc).
    const int64_t per_image = std::min(K, std::max<int64_t>(1, 4 * threads_ / std::max<int64_t>(d_.N, 1)));
    const int64_t lanes = table_->dwconv<T>().lanes;
    int64_t run = ceil_div(K, per_image);
    if (d_.Cg() == 1 && d_.Kg() == 1 && d_.Q() < lanes) run = round_up(run, lanes);
    const int64_t runs = ceil_div(K, run);
    parallel_for(d_.N * runs, threads_, [&](int64_t task) {
      const int64_t n = task / runs, k0 = task % runs * run, k1 = std::min(K, k0 + run);
      direct_rows(x, wt, n, k0, k1, 0, P, y + (n * K + k0) * PQ, PQ);
    });
    return;
  }
  if (algo_ == ConvAlgo::im2col_gemm) {
    run_im2col_gemm(x, wt, y);
    return;
  }
  if (transposed()) {  // mc_: pixels per task, nc_: channels per task
    const int64_t pblocks = ceil_div(PQ, mc_), cblocks = ceil_div(Kg, nc_);
    const std::vector<int64_t> k_off = algo_ == ConvAlgo::indirect_gemm ? tap_offsets(x) : std::vector<int64_t>();
    parallel_for(d_.N * G * pblocks * cblocks, threads_, [&](int64_t task) {
      const int64_t cb = task % cblocks, pb = (task / cblocks) % pblocks;
      const int64_t g = (task / (cblocks * pblocks)) % G, n = task / (cblocks * pblocks * G);
      const int64_t j0 = pb * mc_, j1 = std::min(PQ, j0 + mc_), n0 = cb * nc_, nlen = std::min(nc_, Kg - n0);
      T* C = y + (n * K + g * Kg + n0) * PQ + j0;
      if (algo_ == ConvAlgo::indirect_gemm)
        indirect_tile(x, wt, k_off.data(), n, g, j0, j1, n0, nlen, C, PQ);
      else
        gemm_t_tile(x, wt, n, g, j0, j1, n0, nlen, C, PQ);
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
  if (group_planes_) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t p = r0; p < r1; p += rows_per_band_)
        group_planes_rows(x, wt, n, g, p, std::min(r1, p + rows_per_band_), dst + g * Kg * ldc + (p - r0) * Q, ldc);
    return;
  }
  if (algo_ == ConvAlgo::direct) {
    direct_rows(x, wt, n, 0, K, r0, r1, dst, ldc);
    return;
  }
  if (transposed()) {
    const std::vector<int64_t> k_off = algo_ == ConvAlgo::indirect_gemm ? tap_offsets(x) : std::vector<int64_t>();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j0 = r0 * Q; j0 < r1 * Q; j0 += mc_) {
        const int64_t j1 = std::min(r1 * Q, j0 + mc_);
        T* C = dst + g * Kg * ldc + (j0 - r0 * Q);
        if (algo_ == ConvAlgo::indirect_gemm)
          indirect_tile(x, wt, k_off.data(), n, g, j0, j1, 0, Kg, C, ldc);
        else
          gemm_t_tile(x, wt, n, g, j0, j1, 0, Kg, C, ldc);
      }
    return;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j0 = r0 * Q; j0 < r1 * Q; j0 += nc_)
      gemm_tile(x, wt, n, g, 0, Kg, j0, std::min(r1 * Q, j0 + nc_), dst + g * Kg * ldc + (j0 - r0 * Q), ldc);
}

template <class T>
void Conv2dPlan<T>::gemm_t_tile(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t j0,
                                int64_t j1, int64_t n0, int64_t nlen, T* C, int64_t ldc) const {
  const int64_t Kg = d_.Kg(), Cg = d_.Cg(), CRS = Cg * d_.R * d_.S, m = j1 - j0;
  const int nr = uk_.nr, mr = uk_.mr;
  T* A = scratch_array<T>(kPackSlot, static_cast<size_t>(kc_ * round_up(m, mr)));
  // Pixels x channels, accumulated here and stored into the channel planes once.
  const int64_t ldt = round_up(nlen, nr);
  T* tile = scratch_array<T>(kTileSlot, static_cast<size_t>(m * ldt));
  const T* xg = x.ptr<T>() + n * x.strides[0] + g * Cg * x.strides[1];
  // n0 is a multiple of NR, so it starts a panel of packed weights.
  const T* B = wt.w + g * round_up(Kg, nr) * CRS + (n0 / nr) * CRS * nr;
  for (int64_t pc = 0; pc < CRS; pc += kc_) {
    const int64_t kc = std::min(kc_, CRS - pc);
    pack_im2col(d_, xg, x.strides[1], x.strides[2], x.strides[3], pc, kc, j0, j1, mr, A);  // pixels as A rows
    GemmEpilogue<T> ep;
    ep.bias = (pc == 0 && wt.bias) ? wt.bias + g * Kg + n0 : nullptr;
    ep.bias_per_row = false;
    ep.accumulate = pc > 0;
    ep.relu = d_.act == Activation::relu && pc + kc == CRS;
    macro_kernel(uk_, m, nlen, kc, A, kc * mr, int64_t{0}, B + pc * nr, CRS * nr, tile, ldt, ep);
  }
  store_transposed(tile, ldt, m, nlen, C, ldc);
}

template <class T>
void Conv2dPlan<T>::run_im2col_gemm(const TensorView& x, const Weights& wt, T* y) const {
  const int64_t K = d_.K, G = d_.groups, Kg = d_.Kg(), CRS = d_.Cg() * d_.R * d_.S, PQ = d_.P() * d_.Q();
  const int nr = uk_.nr;
  const int64_t PQp = round_up(PQ, nr), kblocks = ceil_div(CRS, kc_), panels = PQp / nr;
  // The whole image's im2col matrix, per group: K block after K block, each
  // as NR-column panels. Owned by the calling thread, reused across calls.
  T* B = scratch_array<T>(kImageSlot, static_cast<size_t>(G * CRS * PQp));
  const int64_t nblocks = ceil_div(PQ, nc_), mblocks = ceil_div(Kg, mc_);
  const int64_t chunk = std::max<int64_t>(1, nc_ / nr);  // panels packed per task
  const int64_t pchunks = ceil_div(panels, chunk);
  for (int64_t n = 0; n < d_.N; ++n) {
    parallel_for(G * kblocks * pchunks, threads_, [&](int64_t task) {
      const int64_t pcb = task % pchunks, kb = (task / pchunks) % kblocks, g = task / (pchunks * kblocks);
      const int64_t pc = kb * kc_, kc = std::min(kc_, CRS - pc);
      const int64_t j0 = pcb * chunk * nr, j1 = std::min(PQ, j0 + chunk * nr);
      const T* xg = x.ptr<T>() + n * x.strides[0] + g * d_.Cg() * x.strides[1];
      pack_im2col(d_, xg, x.strides[1], x.strides[2], x.strides[3], pc, kc, j0, j1, nr,
                  B + g * CRS * PQp + pc * PQp + (j0 / nr) * kc * nr);
    });
    parallel_for(G * nblocks * mblocks, threads_, [&](int64_t task) {
      const int64_t mb = task % mblocks, jb = (task / mblocks) % nblocks, g = task / (mblocks * nblocks);
      const int64_t j0 = jb * nc_, m0 = mb * mc_;
      gemm_tile(x, wt, n, g, m0, std::min(mc_, Kg - m0), j0, std::min(PQ, j0 + nc_),
                y + (n * K + g * Kg + m0) * PQ + j0, PQ, B + g * CRS * PQp);
    });
  }
}

template <class T>
void Conv2dPlan<T>::gemm_tile(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t m0, int64_t m,
                              int64_t j0, int64_t j1, T* C, int64_t ldc, const T* Bimage) const {
  const int64_t Kg = d_.Kg(), Cg = d_.Cg(), CRS = Cg * d_.R * d_.S;
  const int nr = uk_.nr, mr = uk_.mr;
  const int64_t group_stride = wt.lda == 0 ? round_up(Kg, mr) * CRS : Kg * CRS;
  const int64_t PQp = round_up(d_.P() * d_.Q(), nr);
  T* B = Bimage ? nullptr : scratch_array<T>(kPackSlot, static_cast<size_t>(kc_ * round_up(j1 - j0, nr)));
  const T* xg = x.ptr<T>() + n * x.strides[0] + g * Cg * x.strides[1];
  // m0 is a multiple of MR, so it starts a panel of packed weights.
  const T* A = wt.w + g * group_stride + (wt.lda == 0 ? (m0 / mr) * CRS * mr : m0 * wt.lda);
  for (int64_t pc = 0; pc < CRS; pc += kc_) {
    const int64_t kc = std::min(kc_, CRS - pc);
    const T* Bk;
    if (Bimage) {
      Bk = Bimage + pc * PQp + (j0 / nr) * kc * nr;  // j0 is a multiple of NR here
    } else {
      pack_im2col(d_, xg, x.strides[1], x.strides[2], x.strides[3], pc, kc, j0, j1, nr, B);
      Bk = B;
    }
    GemmEpilogue<T> ep;
    ep.bias = (pc == 0 && wt.bias) ? wt.bias + g * Kg + m0 : nullptr;
    ep.bias_per_row = true;
    ep.accumulate = pc > 0;
    ep.relu = d_.act == Activation::relu && pc + kc == CRS;
    macro_kernel(uk_, m, j1 - j0, kc, A + (wt.lda == 0 ? pc * mr : pc), CRS * mr, wt.lda, Bk, kc * nr, C, ldc, ep);
  }
}

template <class T>
int64_t Conv2dPlan<T>::band_rows() const {
  const int64_t Q = d_.Q();
  const int64_t out_rows = (mc_ + Q - 2) / Q + 1;  // a run of mc_ pixels spans at most this many output rows
  return (out_rows - 1) * d_.stride_h + (d_.R - 1) * d_.dil_h + 1;
}

template <class T>
std::vector<int64_t> Conv2dPlan<T>::tap_offsets(const TensorView& x) const {
  // Offsets of tap (c, r, s) from a pixel's first input element: in x itself
  // when there is no padding, else in the band buffer (Cg x band_rows x Wp).
  const int64_t Wp = d_.W + d_.pad_left + d_.pad_right;
  const bool band = padded();
  const int64_t sc = band ? band_rows() * Wp : x.strides[1], sh = band ? Wp : x.strides[2];
  const int64_t sw = band ? 1 : x.strides[3];
  std::vector<int64_t> off;
  off.reserve(static_cast<size_t>(d_.Cg() * d_.R * d_.S));
  for (int64_t c = 0; c < d_.Cg(); ++c)
    for (int64_t r = 0; r < d_.R; ++r)
      for (int64_t s = 0; s < d_.S; ++s) off.push_back(c * sc + r * d_.dil_h * sh + s * d_.dil_w * sw);
  return off;
}

template <class T>
void Conv2dPlan<T>::indirect_tile(const TensorView& x, const Weights& wt, const int64_t* k_off, int64_t n, int64_t g,
                                  int64_t j0, int64_t j1, int64_t n0, int64_t nlen, T* C, int64_t ldc) const {
  const int64_t Kg = d_.Kg(), Cg = d_.Cg(), CRS = Cg * d_.R * d_.S, Q = d_.Q();
  const int nr = uk_.nr, mr = uk_.mr;
  const T* xg = x.ptr<T>() + n * x.strides[0] + g * Cg * x.strides[1];
  const T* src = xg;  // where pixel (p, q)'s first tap lies: src + p*row_step + q*col_step
  int64_t row_step = d_.stride_h * x.strides[2], col_step = d_.stride_w * x.strides[3], p_lo = 0;
  if (padded()) {
    // Copy the padded rows this tile reads into a band buffer; padding is zeros.
    const int64_t Wp = d_.W + d_.pad_left + d_.pad_right, rows = band_rows();
    p_lo = j0 / Q;
    const int64_t row0 = p_lo * d_.stride_h;  // in padded coordinates
    const int64_t used = std::min(d_.H + d_.pad_top + d_.pad_bottom, ((j1 - 1) / Q) * d_.stride_h + (d_.R - 1) * d_.dil_h + 1) - row0;
    T* band = scratch_array<T>(kInputBandSlot, static_cast<size_t>(Cg * rows * Wp));
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t r = 0; r < used; ++r) {
        T* out = band + (c * rows + r) * Wp;
        const int64_t ih = row0 + r - d_.pad_top;
        if (ih < 0 || ih >= d_.H) {
          std::fill(out, out + Wp, T(0));
          continue;
        }
        const T* in = xg + c * x.strides[1] + ih * x.strides[2];
        std::fill(out, out + d_.pad_left, T(0));
        if (x.strides[3] == 1)
          std::memcpy(out + d_.pad_left, in, d_.W * sizeof(T));
        else
          for (int64_t w = 0; w < d_.W; ++w) out[d_.pad_left + w] = in[w * x.strides[3]];
        std::fill(out + d_.pad_left + d_.W, out + Wp, T(0));
      }
    src = band;
    row_step = d_.stride_h * Wp;
    col_step = d_.stride_w;
  }
  const int64_t m = j1 - j0;
  const T** rows_ptr = reinterpret_cast<const T**>(scratch(kPointerSlot, static_cast<size_t>(m) * sizeof(T*)));
  for (int64_t j = j0; j < j1; ++j) rows_ptr[j - j0] = src + (j / Q - p_lo) * row_step + (j % Q) * col_step;

  // Pixels x channels, accumulated here and stored into the channel planes once.
  const int64_t ldt = round_up(nlen, nr);
  T* tile = scratch_array<T>(kTileSlot, static_cast<size_t>(m * ldt));
  // n0 is a multiple of NR, so it starts a panel of packed weights.
  const T* B = wt.w + g * round_up(Kg, nr) * CRS + (n0 / nr) * CRS * nr;
  for (int64_t pc = 0; pc < CRS; pc += kc_) {
    const int64_t kc = std::min(kc_, CRS - pc);
    GemmEpilogue<T> ep;
    ep.bias_per_row = false;
    ep.accumulate = pc > 0;
    ep.relu = d_.act == Activation::relu && pc + kc == CRS;
    // Each weight panel (kc x NR) serves every group of MR pixels while in L1.
    for (int64_t j = 0; j < nlen; j += nr) {
      const int nn = static_cast<int>(std::min<int64_t>(nr, nlen - j));
      const T* b = B + (j / nr) * CRS * nr + pc * nr;
      ep.bias = (pc == 0 && wt.bias) ? wt.bias + g * Kg + n0 + j : nullptr;
      for (int64_t i = 0; i < m; i += mr) {
        const int mm = static_cast<int>(std::min<int64_t>(mr, m - i));
        uk_.indirect(kc, rows_ptr + i, k_off + pc, b, tile + i * ldt + j, ldt, mm, nn, ep);
      }
    }
  }
  store_transposed(tile, ldt, m, nlen, C, ldc);
}

template <class T>
void Conv2dPlan<T>::group_planes_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t r0,
                                      int64_t r1, T* out, int64_t ldk) const {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t Cg = d_.Cg(), Kg = d_.Kg(), Wb = band_width_, plane = band_rows_ * Wb, sw = d_.stride_w;
    const int64_t rows = (r1 - r0 - 1) * d_.stride_h + (d_.R - 1) * d_.dil_h + 1;
    // The group's input rows for output rows [r0, r1), padded (padded column
    // j in phase plane j % sw, at j / sw): the taps are then fixed offsets.
    float* band = scratch_array<float>(kInputBandSlot, static_cast<size_t>(Cg * sw * plane));
    const SplitRowsFn split = split_rows_phases_f32(active_isa());
    const float* xg = x.ptr<float>() + n * x.strides[0] + g * Cg * x.strides[1];
    const int64_t ih0 = r0 * d_.stride_h - d_.pad_top;  // band row 0's input row
    const int64_t in0 = std::clamp<int64_t>(-ih0, 0, rows), in1 = std::clamp<int64_t>(d_.H - ih0, in0, rows);
    const int64_t step = x.strides[3], W = d_.W, pad = d_.pad_left;
    for (int64_t c = 0; c < Cg; ++c) {
      float* o = band + c * sw * plane;
      split(o, plane, Wb, sw, nullptr, 0, step, W, pad, in0);
      if (in1 > in0)
        split(o + in0 * Wb, plane, Wb, sw, xg + c * x.strides[1] + (ih0 + in0) * x.strides[2], x.strides[2], step, W,
              pad, in1 - in0);
      split(o + in1 * Wb, plane, Wb, sw, nullptr, 0, step, W, pad, rows - in1);
    }
    DirectConvArgs a{};
    a.x = band, a.Wp = Wb, a.pix = 1, a.plane = sw * plane;
    a.tap_off = tap_off_.data(), a.taps = static_cast<int64_t>(tap_off_.size());
    a.w = wt.w + g * a.taps * Kg;
    a.bias = wt.bias ? wt.bias + g * Kg : nullptr;
    a.K = Kg, a.k_begin = 0, a.k_end = Kg, a.C = Cg;
    a.stride_h = d_.stride_h, a.stride_w = 1;
    a.relu = d_.act == Activation::relu;
    a.P = r1 - r0, a.Q = d_.Q(), a.p0 = 0, a.p1 = r1 - r0, a.q0 = 0, a.q1 = d_.Q(), a.row0 = 0;
    a.y = out, a.y_plane = ldk, a.planes_out = true;
    direct_conv_f32(active_isa())(a);
  }
}

template <class T>
void Conv2dPlan<T>::direct_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t k0, int64_t k1,
                                int64_t r0, int64_t r1, T* out, int64_t ldk) const {
  const DwconvUkernel<T>& uk = table_->dwconv<T>();
  DwconvJob<T> j;
  j.x = x.ptr<T>() + n * x.strides[0];
  j.x_c = x.strides[1], j.x_h = x.strides[2], j.x_w = x.strides[3];
  j.H = d_.H, j.W = d_.W, j.pad_top = d_.pad_top, j.pad_left = d_.pad_left;
  j.R = d_.R, j.S = d_.S, j.stride_h = d_.stride_h, j.stride_w = d_.stride_w, j.dil_h = d_.dil_h, j.dil_w = d_.dil_w;
  j.Cg = d_.Cg(), j.Kg = d_.Kg();
  j.k0 = k0, j.k1 = k1, j.r0 = r0, j.r1 = r1, j.Q = d_.Q();
  j.w = wt.w, j.bias = wt.bias, j.relu = d_.act == Activation::relu;
  j.y = out, j.y_k = ldk;
  // All the input rows of the output rows as one band, unless strides or
  // dilations skip most of them: then the R rows of one output row at a time.
  const int64_t rows_out = r1 - r0;
  j.band_rows = (rows_out - 1) * j.stride_h + (j.R - 1) * j.dil_h + 1;
  j.per_row = j.band_rows > 2 * rows_out * j.R;
  // Even, so that a row split in two phases (stride 2) splits into halves.
  j.width = round_up(std::max(j.pad_left + j.W, (round_up(j.Q, uk.lanes) - 1) * j.stride_w + (j.S - 1) * j.dil_w +
                                                    j.stride_w),
                     2);
  // Planes narrower than a vector of one filter per channel, read as whole
  // rows: channels in the lanes (DwconvJob::hwc). One image, two threads:
  // 960 channels 3x3 on 7x7 33 -> 16 us, 512 on 4x4 12.5 -> 5.3, 960 on
  // 14x14 at stride 2 76 -> 31.
  j.hwc = j.Cg == 1 && j.Kg == 1 && k1 - k0 >= uk.lanes && j.Q < uk.lanes && j.R * j.S <= kDwconvHwcMaxTaps &&
          j.x_w == 1 && j.x_h == j.W;
  if (j.hwc) j.per_row = false;
  const int64_t band = j.hwc ? (j.band_rows * j.width + std::max(j.band_rows * j.W, rows_out * j.Q)) * uk.lanes
                             : (j.per_row ? j.R : j.band_rows) * j.width;
  j.band = scratch_array<T>(kInputBandSlot, static_cast<size_t>(band));
  uk.fn(j);
}

template <class T>
std::string Conv2dPlan<T>::describe() const {
  std::string s = cat("conv2d ", dtype_name(dtype_of<T>()), " algo=", conv_algo_name(algo_), " threads=", threads_);
  if (algo_ != ConvAlgo::direct) s += cat(" ukernel=", uk_.name, " kc=", kc_, " mc=", mc_, " nc=", nc_);
  if (group_planes_) s += cat(" planes per group rows_per_task=", rows_per_band_);
  s += cat(" predicted_us=", choice_.time_s * 1e6, " workspace_bytes=", choice_.workspace,
           measured_ ? " chosen_by=measurement" : " chosen_by=cost_model");
  return s;
}

template <class T>
std::string Conv2dPlan<T>::explain() const {
  std::string s = describe() + "\n  candidates of the cost model, cheapest first:";
  const auto all = candidates();
  for (size_t i = 0; i < all.size() && i < 4; ++i) {
    const ConvChoice& c = all[i];
    s += cat("\n    ", conv_algo_name(c.algo), " threads=", c.threads);
    if (c.algo != ConvAlgo::direct)
      s += cat(" ukernel=", table_->gemm<T>(c.shape).name, " kc=", c.kc, " mc=", c.mc, " nc=", c.nc);
    s += cat(" predicted_us=", c.time_s * 1e6, " workspace_bytes=", c.workspace);
  }
  return s;
}

template class Conv2dPlan<float>;
template class Conv2dPlan<double>;

}  // namespace lk::cpu
