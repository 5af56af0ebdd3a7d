// 2-D convolution: a plan is made once per descriptor (algorithm, blocking,
// threads) and runs any number of inputs of that shape, with the caller's
// weights in place or with weights it packed once.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/descriptors.h"
#include "core/memory.h"
#include "core/tensor.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

enum class ConvAlgo {
  implicit_gemm,  // im2col one block of output pixels at a time, then the GEMM microkernel
  im2col_gemm,    // im2col a whole image into a workspace first: no repacking, more memory
  implicit_gemm_t,  // transposed: pixels as GEMM rows, channels across the vector lanes;
                    // for small images with many channels (weights packed into panels)
  indirect_gemm,    // transposed, with the input read in place through per-pixel pointers and
                    // per-tap offsets: no im2col at all (a padded copy of a band when padding)
  direct,         // per output plane; for groups with very few output channels (depthwise)
};

// A caller's restriction of the choice: one algorithm, one microkernel shape.
struct ConvRestrict {
  std::optional<ConvAlgo> algo;
  std::optional<int> shape;
  int64_t key() const { return (algo ? static_cast<int64_t>(*algo) : 15) * 16 + (shape ? *shape : 15); }
};

// One way to run a convolution, with what the cost model predicts for it.
struct ConvChoice {
  ConvAlgo algo = ConvAlgo::implicit_gemm;
  int64_t kc = 0, mc = 0, nc = 0;  // GEMM blocking (0 for direct)
  int shape = 0;                   // which of the level's GEMM microkernels
  int threads = 1;
  double time_s = 0;        // predicted
  int64_t workspace = 0;    // bytes, all threads together
  double cost = 0;          // time_s + lambda * workspace
};

const char* conv_algo_name(ConvAlgo a);
ConvAlgo conv_algo_from(const std::string& name);  // throws std::invalid_argument

// Weights in the layout a plan's kernels read, packed once by Conv2dPlan::pack
// for callers that run many times (modules). The layout depends on the
// algorithm and the microkernel's MR, both fixed by the plan.
template <class T>
struct PackedConvWeights {
  AlignedPtr<T> w;     // per group: MR panels (the GEMM's A), NR panels of W^T (its B), or K x CRS rows
  AlignedPtr<T> bias;  // K entries (padded by NR for the transposed GEMM), or null
  int layout = 0;      // MR for A panels, -NR for B panels, 0 for rows: see weight_layout()
};

template <class T>
class Conv2dPlan {
 public:
  // Picks the algorithm and blocking for the descriptor on the active ISA,
  // by the cost model (or `forced`: a choice measured earlier).
  // prepacked: the caller packs weights once (a layer), so algorithms that
  // need packed weights are not charged for packing on every run.
  // only: consider this algorithm alone (a caller's explicit choice).
  Conv2dPlan(const Conv2dDesc& desc, bool prepacked, const ConvChoice* forced = nullptr,
             ConvRestrict only = {});

  // Every candidate the cost model considered, cheapest first.
  std::vector<ConvChoice> candidates() const;
  const ConvChoice& choice() const { return choice_; }

  // Weights as the kernels read them, bound for one run.
  struct Weights {
    const T* w;     // implicit_gemm: per group, packed panels (lda 0) or Kg x CRS rows (lda CRS)
    int64_t lda;    // direct: K x CRS rows
    const T* bias;  // K contiguous entries, or null
  };
  struct BoundStorage {  // copies made when the caller's weights cannot be read in place
    AlignedPtr<T> weights, bias;
  };

  // weight: K x C/groups x R x S, any strides; bias: K entries or null.
  PackedConvWeights<T> pack(const TensorView& weight, const TensorView* bias) const;
  Weights bind(const PackedConvWeights<T>& packed) const;
  // The caller's weights as K x CRS rows, which every plan of the descriptor
  // can read: in place when contiguous, else copied into storage.
  static Weights bind_rows(const Conv2dDesc& d, const TensorView* weight, const TensorView* bias,
                           BoundStorage& storage);
  // The caller's weights for this plan: rows, or packed into storage when
  // the algorithm needs panels.
  Weights bind(const TensorView* weight, const TensorView* bias, BoundStorage& storage) const;

  // x: N x C x H x W, any strides; y: N x K x P x Q, contiguous.
  void run(const TensorView& x, const Weights& wt, T* y) const;

  // Output rows [r0, r1) of image n, all K channels, into dst (channel k at
  // dst + k * ldc), on the calling thread: for callers that tile and
  // parallelise themselves (fusion).
  void run_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t r0, int64_t r1, T* dst,
                int64_t ldc) const;

  // Which packed layout this plan reads: MR for A panels, -NR for B panels,
  // 0 for rows, kTapMajorLayout for group_planes().
  static constexpr int kTapMajorLayout = -1;
  int weight_layout() const {
    return algo_ == ConvAlgo::direct ? (group_planes_ ? kTapMajorLayout : 0) : transposed() ? -uk_.nr : uk_.mr;
  }

  void check_input(const TensorView& x) const;
  std::string describe() const;
  std::string explain() const;  // describe(), then the cost model's best candidates
  const Conv2dDesc& desc() const { return d_; }
  int threads() const { return threads_; }

 private:
  // Output pixels [j0, j1) (flattened P*Q) of channels [m0, m0+m) in group g.
  // B: the image's im2col panels (im2col_gemm), or null to pack them here.
  void gemm_tile(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t m0, int64_t m, int64_t j0,
                 int64_t j1, T* C, int64_t ldc, const T* B = nullptr) const;
  void run_im2col_gemm(const TensorView& x, const Weights& wt, T* y) const;
  // Transposed: pixels [j0, j1) as rows, channels [n0, n0+n) of group g as
  // columns; C at channel n0's plane, pixel j0.
  void gemm_t_tile(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t j0, int64_t j1, int64_t n0,
                   int64_t nlen, T* C, int64_t ldc) const;
  // The same tile by indirect_gemm; k_off: per-tap offsets into x (unpadded
  // input) or into a band buffer (padded), see tap_offsets().
  void indirect_tile(const TensorView& x, const Weights& wt, const int64_t* k_off, int64_t n, int64_t g, int64_t j0,
                     int64_t j1, int64_t n0, int64_t nlen, T* C, int64_t ldc) const;
  std::vector<int64_t> tap_offsets(const TensorView& x) const;
  bool padded() const { return d_.pad_top || d_.pad_bottom || d_.pad_left || d_.pad_right; }
  int64_t band_rows() const;  // rows of the padded band an indirect tile of mc_ pixels reads, at most
  bool transposed() const { return algo_ == ConvAlgo::implicit_gemm_t || algo_ == ConvAlgo::indirect_gemm; }
  // group_planes(): output rows [r0, r1) of group g of image n, its first
  // channel's row r0 at out, channels ldk apart.
  void group_planes_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t g, int64_t r0, int64_t r1, T* out,
                         int64_t ldk) const;
  // Output rows [r0, r1) of channels [k0, k1) of image n: channel k at out + (k - k0) * ldk.
  void direct_rows(const TensorView& x, const Weights& wt, int64_t n, int64_t k0, int64_t k1, int64_t r0, int64_t r1,
                   T* out, int64_t ldk) const;

  Conv2dDesc d_;
  // The kernels of the level active when the plan was made: a level switched
  // by another thread meanwhile must not mix one level's blocking with
  // another's microkernel (the blocking check failed under such a race).
  const UkernelTable* table_;
  GemmUkernel<T> uk_;
  ConvChoice choice_;
  // direct on float groups of several channels and filters (conv_group_planes):
  // the direct kernel's planes path per group and band of rows, the group's
  // weights tap-major (taps x Kg), tap offsets into a band of band_rows_ rows.
  bool group_planes_ = false;
  int64_t rows_per_band_ = 0, band_rows_ = 0, band_width_ = 0;
  std::vector<int64_t> tap_off_;
  bool measured_ = false;  // chosen by autotuning rather than by the model
  bool prepacked_ = false;
  ConvRestrict only_;
  ConvAlgo algo_;
  int64_t kc_ = 0;  // K-block of the GEMM (rows of C*R*S per pass)
  int64_t mc_ = 0;  // output channels per task (transposed algorithms: pixels)
  int64_t nc_ = 0;  // output pixels per task (transposed algorithms: channels)
  int threads_ = 1;
};

void validate(const Conv2dDesc& d);

}  // namespace lk::cpu
