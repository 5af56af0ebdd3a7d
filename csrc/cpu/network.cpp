#include "cpu/network.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

#include <immintrin.h>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/plan_cache.h"
#include "core/settings.h"
#include "core/thread_pool.h"
#include "cpu/activation.h"
#include "cpu/conv_direct.h"
#include "cpu/conv_pool.h"
#include "cpu/gemm.h"
#include "cpu/linear.h"
#include "cpu/machine.h"
#include "cpu/planner.h"
#include "cpu/pool2d.h"

namespace lk::cpu {

extern const DirectConvFn kConvDirect_generic;
extern const DenseRowsFn kDenseRows_generic;
extern const SplitRowsFn kSplitRows_generic;
#ifdef LK_HAVE_X86_KERNELS
extern const DirectConvFn kConvDirect_avx2, kConvDirect_avx512;
extern const DenseRowsFn kDenseRows_avx2, kDenseRows_avx512;
extern const SplitRowsFn kSplitRows_avx2, kSplitRows_avx512;
#define LK_OF_ISA(isa, name) \
  ((isa) == Isa::avx512 ? name##_avx512 : (isa) == Isa::avx2 ? name##_avx2 : name##_generic)
#else
#define LK_OF_ISA(isa, name) ((void)(isa), name##_generic)
#endif

DirectConvFn direct_conv_f32(Isa isa) { return LK_OF_ISA(isa, kConvDirect); }
DenseRowsFn dense_rows_f32(Isa isa) { return LK_OF_ISA(isa, kDenseRows); }
SplitRowsFn split_rows_phases_f32(Isa isa) { return LK_OF_ISA(isa, kSplitRows); }
#undef LK_OF_ISA

namespace {

std::atomic<int64_t> g_arenas{0};

using Shape = std::vector<int64_t>;  // per image: no batch dimension

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t v : s) n *= v;
  return n;
}

std::string shape_str(const Shape& s, bool batched = false) {
  std::string out = batched ? "(N" : "(";
  for (size_t i = 0; i < s.size(); ++i) out += cat((i || batched) ? ", " : "", s[i]);
  return out + (s.size() == 1 && !batched ? ",)" : ")");
}

// The direct kernel wins while the reduction is this short (a network's first
// layer: 1 or 3 channels, 3x3): the GEMM's packing and call overheads are
// paid per handful of multiply-adds there. Followed by a 2x2 max-pool it also
// wins on longer ones (measured on lepton-cifar's 32 -> 64 3x3: 10% less time
// for the network than the GEMM with banded pooling), since it pools in
// registers and writes a quarter of the GEMM's output.
constexpr int64_t kDirectMaxTaps = 64;
// Unpooled into channel planes, a row's pixels in vector lanes (the planes
// kernel), it also beats the GEMM on longer reductions over rows of at least
// a vector: measured, one image, 3x3: 32 -> 64 channels on 16x16 47 against
// 78 us, 64 -> 64 on 56x56 1.21 against 1.36 ms; but 128 -> 128 on 28x28
// 1.37 against 1.18 ms.
constexpr int64_t kPlanesMaxTaps = 576;
// On a first layer's few planes, column strides up to kPlanesMaxStride take
// the planes kernel too: the band copy splits each plane's columns by their
// remainder modulo the stride ("phases"), where the windows' columns are a
// stride-1 convolution. Measured, one image, 2 threads: ResNet's 7x7
// stride-2 stem (147 taps over 3 x 2 phase planes) 1.11 against the GEMM's
// 1.21 ms; but 64 -> 128 channels 3x3 stride 2 on 56x56 0.77 against 0.61.
constexpr int64_t kPlanesMaxStride = 4, kPlanesStridedMaxPlanes = 4;
static_assert(kPlanesMaxStride <= kMaxPhases);
constexpr int64_t kDirectMaxTapsPooled = 512;
// The direct kernel's rate against the wide GEMM microkernel's: measured 0.5
// with 9 taps (mnist: short loops, the band copy and stores weigh more) and
// 0.85 with 288 (cifar's second layer).
double direct_efficiency(int64_t taps) { return taps < 32 ? 0.5 : 0.85; }

// Where Winograd applies: 3x3, stride 1, channels in vectors, and the
// transformed filters within what L3 keeps, since each block of tiles reads
// all of them: F(4x4) (pooled), 4x the filters, up to 16 MB; F(2x2)
// (unpooled), 16/9 of them, up to 20 MB. Past L3 they come from memory at a
// quarter of the rate (measured, one image, unpooled F(4x4): 256 -> 256
// channels on 14x14, 9.4 MB, 0.45 ms against the GEMM's 1.35; 512 -> 512 on
// 7x7, 38 MB, 5.3 ms against 1.4).
bool winograd_suits(const Conv2dDesc& d, bool pooled) {
  return d.R == 3 && d.S == 3 && d.stride_h == 1 && d.stride_w == 1 && d.dil_h == 1 && d.dil_w == 1 &&
         d.C % 16 == 0 && (pooled ? 36 : 16) * d.C * d.K * 4 <= (pooled ? 16 << 20 : 20 << 20);
}

// Transformed filters streamed from L3 by one thread, bytes per second
// (measured: 70-99 GB/s per thread reading 8-16 MB on 2 threads, 51-58 at 24 MB).
constexpr double kL3Rate = 60e9;
// F(2x2) with channel planes out: the band's outputs wait in the tile for
// their transpose, within a quarter of L2.
constexpr int64_t kWino2BandBytes = 256 * 1024;

// Winograd F(4x4, 3x3) with the pool fused (conv_direct.inc): 9 multiply-adds
// per channel and filter per pooled output against the taps' 36, at a lower
// rate: the reduction is only C long per product, and the transforms add
// vector operations per element of the tile. Measured (one thread, against
// the wide GEMM microkernel's rate): 0.66 with 16 -> 32 channels, 0.80 with
// 32 -> 64, 0.61 with 48 -> 48 (a 16-filter tail block); 1.66-1.70x faster
// than F(2x2, 3x3), which it replaced. Its rounding error stays a few percent
// of the tests' tolerance (transforms with entries up to 8 and 1/24).
// Only for finite inputs (conv_direct.h's x_bound): an infinity would mix
// into its whole 6x6 tile, a NaN where the taps give an infinity or nothing.
constexpr double kWino4Efficiency = 0.65;
// F(2x2, 3x3), unpooled: 16 multiply-adds per channel and filter for 4
// outputs, against the taps' 36, rounding about as the direct sum does
// (F(4x4) unpooled: ten times that, past the benchmarks' float32 checks).
// Measured, one image, 2 threads, against the GEMM: 64 -> 64 channels on
// 56x56 0.79 against 1.17 ms, 128 on 28x28 0.71 against 1.19, 256 on 14x14
// 0.67 against 1.33 (the rate against the GEMM microkernel's 0.66-0.89);
// 512 on 7x7, the filters in two groups, 0.74 against 1.52.
constexpr double kWino2Efficiency = 0.7;
// F(2, 3) along the rows of planes (a first layer): 24 multiply-adds per
// plane and filter per pooled output against the taps' 36, and 8 additions.
// With AVX-512 it wins on 1 to 4 planes (3x3 -> 32 filters + pool on 32x32
// images, batch 16, one thread: 1 plane 120 -> 99 us, 3 planes 294 -> 218,
// 4 planes 381 -> 284; the rate against the wide GEMM microkernel's about
// 0.45). Below AVX-512 a tile's 8 accumulators leave no room for more than one
// tile at a time in 16 registers, and it loses (AVX2: 202 -> 235 us, 476 -> 630).
constexpr double kWinoRowEfficiency = 0.45;
// F(4, 4) along the rows of the column phases (DirectConvArgs::phases_wino):
// per chunk of 64 outputs and filter, 14 multiply-adds per plane and filter
// row and 37 operations of A^T, bias, shuffles and stores; its rate against
// the wide GEMM microkernel's, with the input transforms. Measured on the
// ResNet stem, one thread: 1.31 ms against the planes kernel's 2.12, which
// these counts put at 1.03x the planes kernel's rate.
constexpr double kWinoPhaseEfficiency = 0.85;

// Its operations per output and filter, one per lane of a vector, counting
// the lanes of a last chunk past the row.
double phases_wino_ops(const Conv2dDesc& d) {
  return (14.0 * d.C * d.R + 37) * 16 * ceil_div(d.Q(), 64) / d.Q();
}

// Where its kernel applies, sizes aside: 7 columns at stride 2 on 1 to 4
// planes (a stem) with more taps than the pixels x filters kernel takes (so
// the planes kernel would).
bool phases_wino_kernel_suits(const Conv2dDesc& d, const ConvRestrict& only) {
  return direct_kernel_suits(d, nullptr, only) && d.S == 7 && d.stride_w == 2 && d.dil_w == 1 &&
         d.C <= kWinoRowMaxPlanes && d.C * d.R * d.S > kDirectMaxTaps && (d.R - 1) * d.dil_h + 1 <= kWinoPhaseMaxRows &&
         active_isa() == Isa::avx512;
}

// And where its chunks of 64 outputs leave fewer lanes idle than its
// products save.
bool phases_wino_suits(const Conv2dDesc& d, const ConvRestrict& only) {
  return phases_wino_kernel_suits(d, only) &&
         phases_wino_ops(d) / kWinoPhaseEfficiency <
             7.0 * d.C * d.R * round_up(d.Q(), 16) / d.Q() / direct_efficiency(7 * d.C * d.R);
}

enum class StageKind { direct, conv, conv_pool, pool, relu, softmax, linear };

const char* stage_name(StageKind k) {
  switch (k) {
    case StageKind::direct: return "conv2d(direct)";
    case StageKind::conv: return "conv2d";
    case StageKind::conv_pool: return "conv2d+max_pool2d";
    case StageKind::pool: return "max_pool2d";
    case StageKind::relu: return "relu";
    case StageKind::softmax: return "softmax";
    default: return "linear";
  }
}

// A stage: one or more of the caller's layers fused into one pass.
struct Stage {
  StageKind kind = StageKind::relu;
  int first = 0, last = 0;  // the caller's layers it covers
  Shape in, out;            // per image
  const NetLayerSpec* layer = nullptr;  // conv or linear: the layer with the weights
  Conv2dDesc conv;                      // N = 1
  std::optional<Pool2dDesc> pool;       // fused (conv) or alone (pool), N = 1
  int pool_layer = -1;                  // conv_pool: the caller's layer of the pool
  Activation act = Activation::none;    // conv, linear
  bool hwc_out = false;                 // direct: pixels x channels, for a flatten + linear or a direct stage after it
  bool hwc_in = false;                  // linear, direct: the input arrives as pixels x channels
  bool planes_out = false;              // direct: DirectConvArgs::planes_out
  bool planes_wino = false;             // direct: DirectConvArgs::planes_wino
  bool phases_wino = false;             // direct: DirectConvArgs::phases_wino
  bool planes_only = false;             // direct: a reduction only the planes kernel takes (kPlanesMaxTaps)
  int wino = 0;  // direct: Winograd F(2, 3) on rows (1), F(2x2, 3x3) (2) or F(4x4, 3x3) (4) instead of the taps
  Shape hwc_shape;                      // C, H, W of that input
  int softmax_after = 0;                // linear: 1 softmax, 2 log-softmax of each row after it
  int64_t outer = 0, dim = 0, inner = 0;  // softmax, per image
  bool log = false;

  bool spatial() const { return kind != StageKind::linear; }
  bool pooled() const { return pool.has_value(); }
};

struct Builder {
  const std::vector<NetLayerSpec>& layers;
  std::vector<Stage> stages;
  Shape result;  // the output's shape per image

  std::string where(size_t i) const { return cat("layer ", i, " (", layers[i].name, "): "); }

  template <class F>
  void wrapped(size_t i, F&& f) const {
    try {
      f();
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(where(i) + e.what());
    }
  }

  std::vector<Stage> build(const Shape& input) {
    Shape s = input;
    bool fusable = false;   // the last stage may take this layer in
    bool flattened = false;  // a flatten came after the last stage
    for (size_t i = 0; i < layers.size(); ++i) {
      const NetLayerSpec& l = layers[i];
      Stage* prev = fusable && !stages.empty() ? &stages.back() : nullptr;
      const int li = static_cast<int>(i);
      switch (l.op) {
        case NetOp::identity:
          break;
        case NetOp::flatten: {
          const int64_t a = l.dim - 1;  // the axis of the per-image shape
          LK_CHECK(l.dim >= 1, where(i), "start_dim: must not flatten the batch dimension, got ", l.dim);
          LK_CHECK(a < static_cast<int64_t>(s.size()) || (s.empty() && a == 0), where(i), "start_dim ", l.dim,
                   " is out of range for an input of shape ", shape_str(s, true));
          if (!s.empty()) {
            Shape t(s.begin(), s.begin() + a);
            t.push_back(numel(Shape(s.begin() + a, s.end())));
            if (t != s) flattened = true;
            s = t;
          }
          break;
        }
        case NetOp::conv2d: {
          LK_CHECK(s.size() == 3, where(i), "expected a (C, H, W) input per image, got shape ", shape_str(s, true));
          LK_CHECK(s[0] == l.conv.C, where(i), "expected ", l.conv.C, " input channels, got ", s[0],
                   " (input shape ", shape_str(s, true), ")");
          Stage g;
          g.kind = StageKind::conv;
          g.first = g.last = li;
          g.in = s;
          g.layer = &l;
          g.conv = l.conv;
          g.conv.N = 1, g.conv.H = s[1], g.conv.W = s[2];
          g.act = l.conv.act;
          wrapped(i, [&] { validate(g.conv); });
          s = {g.conv.K, g.conv.P(), g.conv.Q()};
          if (l.pool) {
            add_pool(g, *l.pool, i, s);
            g.kind = StageKind::conv_pool;
            g.pool_layer = li;
          }
          g.out = s;
          stages.push_back(std::move(g));
          fusable = true, flattened = false;
          break;
        }
        case NetOp::max_pool2d: {
          LK_CHECK(s.size() == 3, where(i), "expected a (C, H, W) input per image, got shape ", shape_str(s, true));
          if (prev && !flattened && prev->kind == StageKind::conv) {  // conv -> pool: one pass
            add_pool(*prev, *l.pool, i, s);
            prev->kind = StageKind::conv_pool;
            prev->pool_layer = li;
            prev->last = li;
            prev->out = s;
            break;
          }
          Stage g;
          g.kind = StageKind::pool;
          g.first = g.last = li;
          g.in = s;
          add_pool(g, *l.pool, i, s);
          g.out = s;
          stages.push_back(std::move(g));
          fusable = true, flattened = false;
          break;
        }
        case NetOp::relu: {
          // ReLU commutes with max-pooling and flattening: it joins the stage before.
          if (prev && prev->act == Activation::none && prev->softmax_after == 0 &&
              (prev->kind == StageKind::conv || prev->kind == StageKind::conv_pool ||
               prev->kind == StageKind::linear)) {
            prev->act = Activation::relu;
            prev->last = li;
            break;
          }
          Stage g;
          g.kind = StageKind::relu;
          g.first = g.last = li;
          g.in = g.out = s;
          stages.push_back(std::move(g));
          fusable = true, flattened = false;
          break;
        }
        case NetOp::linear: {
          LK_CHECK(!s.empty() && s.back() == l.in_features, where(i), "expected ", l.in_features,
                   " input features in the last dimension, got shape ", shape_str(s, true),
                   s.size() > 1 ? " (a Flatten before it makes one dimension of them)" : "");
          Stage g;
          g.kind = StageKind::linear;
          g.first = g.last = li;
          g.in = s;
          g.layer = &l;
          g.act = l.act;
          s.back() = l.out_features;
          g.out = s;
          stages.push_back(std::move(g));
          fusable = true, flattened = false;
          break;
        }
        case NetOp::softmax:
        case NetOp::log_softmax: {
          const int64_t rank = static_cast<int64_t>(s.size()) + 1;
          LK_CHECK(l.dim >= -rank && l.dim < rank, where(i), "dim ", l.dim, " is out of range for an input of shape ",
                   shape_str(s, true));
          const int64_t d = l.dim < 0 ? l.dim + rank : l.dim;
          LK_CHECK(d != 0, where(i), "dim: a network normalises within each sample, not across the batch (dim 0)");
          const int64_t a = d - 1;
          const bool log = l.op == NetOp::log_softmax;
          if (prev && !flattened && prev->kind == StageKind::linear && prev->softmax_after == 0 &&
              a == static_cast<int64_t>(s.size()) - 1) {
            prev->softmax_after = log ? 2 : 1;
            prev->last = li;
            break;
          }
          Stage g;
          g.kind = StageKind::softmax;
          g.first = g.last = li;
          g.in = g.out = s;
          g.outer = numel(Shape(s.begin(), s.begin() + a));
          g.dim = s[a];
          g.inner = numel(Shape(s.begin() + a + 1, s.end()));
          g.log = log;
          stages.push_back(std::move(g));
          fusable = true, flattened = false;
          break;
        }
      }
    }
    choose_direct();
    result = s;
    return std::move(stages);
  }

  void add_pool(Stage& g, const Pool2dDesc& params, size_t i, Shape& s) const {
    Pool2dDesc p = params;
    p.N = 1, p.C = s[0], p.H = s[1], p.W = s[2];
    wrapped(i, [&] { validate(p); });
    g.pool = p;
    s = {p.C, p.P(), p.Q()};
  }

  // Short reductions go to the direct kernel; its output is laid out pixels x
  // channels when a flatten + linear follows (the linear's weight columns are
  // permuted to match once, when packed), saving a transpose per image.
  void choose_direct() {
    // A pool after a stem that F(4, 4) on the column phases takes: not in
    // the same pass (the direct kernel fuses only 2x2 pools, and not with
    // this one), but in a pass of its own after it, where the GEMM would
    // fuse it at the GEMM's rate (ResNet's stem, ReLU and 3x3 pool, one
    // image, 2 threads: 1.38-1.40 -> 0.74-0.81 ms).
    for (size_t k = 0; k < stages.size(); ++k) {
      Stage& g = stages[k];
      if (g.kind != StageKind::conv_pool || !phases_wino_suits(g.conv, g.layer->only)) continue;
      Stage pool;
      pool.kind = StageKind::pool;
      pool.first = pool.last = g.pool_layer;
      pool.in = {g.conv.K, g.conv.P(), g.conv.Q()};
      pool.pool = g.pool;
      pool.out = g.out;
      g.kind = StageKind::conv;
      g.pool.reset();
      g.out = pool.in;
      if (g.last == g.pool_layer && g.first < g.pool_layer) g.last = g.pool_layer - 1;
      stages.insert(stages.begin() + static_cast<std::ptrdiff_t>(k) + 1, std::move(pool));
    }
    for (size_t k = 0; k < stages.size(); ++k) {
      Stage& g = stages[k];
      if (g.kind != StageKind::conv && g.kind != StageKind::conv_pool) continue;
      const Conv2dDesc& d = g.conv;
      g.planes_only = !g.pool && d.C * d.R * d.S > kDirectMaxTaps && !winograd_suits(d, false);
      if (!direct_kernel_suits(d, g.pool ? &*g.pool : nullptr, g.layer->only) ||
          (g.pool && (g.pool->P() != d.P() / 2 || g.pool->Q() != d.Q() / 2)) || (g.planes_only && d.Q() < 16))
        continue;
      g.kind = StageKind::direct;
    }
    // Direct stages hand pixels x channels to a direct stage after them (its
    // band copy is then whole rows, and no transpose is stored in between).
    for (size_t k = 0; k + 1 < stages.size(); ++k) {
      Stage& g = stages[k];
      Stage& next = stages[k + 1];
      if (g.kind != StageKind::direct || g.planes_only || (next.kind == StageKind::direct && next.planes_only)) continue;
      if ((next.kind == StageKind::linear && next.in.size() == 1) || next.kind == StageKind::direct) {
        g.hwc_out = true;
        next.hwc_in = true;
        next.hwc_shape = g.out;
      }
    }
    // Winograd where its kernel applies (3x3, stride 1, the 2x2 pool fused,
    // channels a multiple of 16, interleaved in vectors: channel planes are
    // interleaved by the band copy) and the cost model prefers it.
    for (Stage& g : stages) {
      if (g.kind != StageKind::direct) continue;
      const Conv2dDesc& d = g.conv;
      if (!g.hwc_in && g.pool && d.R == 3 && d.S == 3 && d.stride_h == 1 && d.stride_w == 1 && d.dil_h == 1 &&
          d.dil_w == 1 && d.C <= kWinoRowMaxPlanes && active_isa() == Isa::avx512)
        g.wino = 1;
      if (!winograd_suits(d, g.pool.has_value())) continue;
      const double taps_s = 36.0 * d.C / direct_efficiency(9 * d.C);  // per pooled output and filter
      if (!g.pool)  // F(2x2): F(4x4)'s rounding unpooled is about ten times the direct sum's
        g.wino = 2;
      else if (9.0 * d.C / kWino4Efficiency < taps_s)
        g.wino = 4;
    }
    for (Stage& g : stages)
      g.planes_out = g.kind == StageKind::direct && !g.pool && !g.wino && !g.hwc_in && !g.hwc_out &&
                     (g.planes_only || g.conv.stride_w == 1);
    // F(2, 3) along rows in the planes kernel: 3x3 at stride 1 on 1 to 4
    // planes (measured, one thread, 16 images: 1 -> 32 on 28x28 100 -> 88
    // us, 3 -> 32 on 32x32 290-340 -> 235-270).
    for (Stage& g : stages) {
      const Conv2dDesc& d = g.conv;
      g.planes_wino = g.planes_out && d.R == 3 && d.S == 3 && d.stride_h == 1 && d.stride_w == 1 && d.dil_h == 1 &&
                      d.dil_w == 1 && d.C <= kWinoRowMaxPlanes && active_isa() == Isa::avx512;
    }
    for (Stage& g : stages) g.phases_wino = g.planes_out && phases_wino_suits(g.conv, g.layer->only);
  }
};

}  // namespace

bool direct_kernel_suits(const Conv2dDesc& d, const Pool2dDesc* pool, const ConvRestrict& only) {
  if (d.groups != 1 || d.K % 16 != 0 || only.algo) return false;
  if (pool && !(pool->kh == 2 && pool->kw == 2 && pool->stride_h == 2 && pool->stride_w == 2 && !pool->pad_h &&
                !pool->pad_w && pool->dil_h == 1 && pool->dil_w == 1))
    return false;
  if (d.C * d.R * d.S <= (pool ? kDirectMaxTapsPooled : kDirectMaxTaps)) return true;
  // Longer reductions where Winograd applies (choose_direct): pooled,
  // F(4x4, 3x3) at 9 multiply-adds per pooled output, channel and filter,
  // the 2x2 window reduced in registers, where the GEMM takes 36; unpooled,
  // F(2x2, 3x3) at 4 per output against 9.
  if (winograd_suits(d, pool != nullptr)) return true;
  return !pool && (d.stride_w == 1 || (d.stride_w <= kPlanesMaxStride && d.C <= kPlanesStridedMaxPlanes)) &&
         d.C * d.R * d.S <= kPlanesMaxTaps;
}

bool direct_layer_suits(const Conv2dDesc& d, const Pool2dDesc* pool, const ConvRestrict& only) {
  return (direct_kernel_suits(d, pool, only) && (pool || d.stride_w == 1 || d.C * d.R * d.S > kDirectMaxTaps)) ||
         (pool && phases_wino_kernel_suits(d, only));
}

namespace {

// The input rows (or columns) Winograd's whole patches span for n outputs:
// F(4x4), pooled, 2 per tile (6x6 patches); F(2x2), unpooled, 2 (4x4).
int64_t wino_rows(const Stage& s, int64_t n) { return s.wino == 4 ? 2 * round_up(n, 2) + 2 : round_up(n, 2) + 2; }

double imbalance(int64_t tasks, int threads) {
  return static_cast<double>(ceil_div(tasks, threads)) * threads / static_cast<double>(std::max<int64_t>(tasks, 1));
}

double bandwidth() { return std::max(1e9, machine_model().bandwidth); }

// Outputs past this leave the last level cache before anything reads them:
// streaming stores then skip reading each line in before writing it, half
// the traffic (1 -> 32 channels 3x3 on 28x28, 256 images, 22 MB: 1.5-2.0
// -> 1.4-1.8 ms beside the peers, steadier alone; 64 channels on 56x56, 32
// images, 26 MB: 21.7 -> 21.1 ms).
constexpr int64_t kStreamOutBytes = int64_t{16} << 20;

// dst[i] = src[i] for i < n, from dst's first 16-byte boundary on with streaming stores.
void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();  // the stores are weakly ordered: done before the image counts as written
}

}  // namespace

// ---------------------------------------------------------------------------

class NetPlan {
 public:
  NetPlan(const std::vector<NetLayerSpec>& layers, const Shape& batched);
  void run(const TensorView& x, float* y);
  std::string describe() const;
  int64_t arena_bytes() const { return arena_elems_ * static_cast<int64_t>(sizeof(float)); }
  const Shape& out_shape() const { return out_batched_; }
  bool starts_direct() const { return stages_.front().s.kind == StageKind::direct; }
  std::mutex mu;

 private:
  struct Planned {
    Stage s;
    int threads = 1;
    double predicted_s = 0;  // per call of the stage (tile mode: per image)
    std::string plan;
    // direct
    AlignedPtr<float> dw, dbias, uw;  // uw: Winograd's filters (DirectConvArgs::wino_w)
    float x_bound = 0;  // direct, taps: DirectConvArgs::x_bound
    std::vector<int64_t> taps;
    int64_t Wp = 0, band_rows = 0, rows_per_band = 0;
    int64_t k_groups = 1;  // tasks split the filters in this many groups (DirectConvArgs::k_begin)
    int64_t phases = 1;    // planes out at column stride S > 1: each plane's columns in S planes (kPlanesMaxStride)
    DirectConvFn fn = nullptr;
    // conv, conv_pool
    std::shared_ptr<const Conv2dPlan<float>> conv;
    std::shared_ptr<const Conv2dMaxPool2dPlan<float>> conv_pool;
    PackedConvWeights<float> cpacked;
    Conv2dPlan<float>::Weights cw{};
    int64_t pooled_rows_per_band = 0;  // conv_pool run image by image: rows pooled per band (0: the plan's run)
    // linear
    std::shared_ptr<const LinearPlan<float>> linear;
    PackedLinearWeights<float> lpacked;
    LinearPlan<float>::Weights lw{};
  };

  void plan_stage(Planned& p, int64_t images);
  void run_stage(const Planned& p, const TensorView& in, float* out, int64_t images) const;
  void run_direct(const Planned& p, const TensorView& in, float* out, int64_t images) const;
  // split_ with few outputs: the linear stage's weights and partial sums for
  // the direct kernel's epilogue (DirectConvArgs::dense_w).
  struct DenseFuse {
    const float* w;
    int64_t ldw, n;
    float* acc;
  };
  // group: of the filters, p.k_groups of them
  void direct_band(const Planned& p, const TensorView& x, float* y, int64_t n, int64_t p0, int64_t p1, int64_t q0,
                   int64_t q1, const DenseFuse* fuse = nullptr, int64_t group = 0) const;
  void direct_pixels(const Planned& p, const TensorView& x, float* y, int64_t n, int64_t s, int64_t e,
                     const DenseFuse* fuse = nullptr) const;
  void run_split(const TensorView& x, float* y0, float* y1);
  void run_conv_pool_bands(const Planned& p, const TensorView& in, float* out, int64_t images) const;
  TensorView view(const float* data, const Shape& per_image, int64_t images) const;

  Shape in_batched_, out_batched_;
  int64_t N_ = 0;
  int threads_ = 1;
  std::vector<Planned> stages_;
  size_t spatial_ = 0;  // stages [0, spatial_) run image by image in tile mode
  bool tile_ = false;
  // Layer mode, a few images: the first (direct) stage's output pixels split
  // among the threads, each thread then taking the next (linear) stage's dot
  // products over the features of its pixels; the partial sums are added after.
  bool split_ = false;
  bool split_fused_ = false;  // split_, the linear in the direct kernel's epilogue
  std::vector<float> partial_;  // threads x images x outputs
  // Tile mode whose stages after the spatial ones are all linears on the dot
  // kernel: each lane collects the features of the images it takes in a block
  // of its own and runs every kDenseRows of them through those stages, so
  // there is no second hand-off, no wait for the slowest lane between the
  // spatial and the dense stages, and the lanes' dense work grows with their
  // share of the images.
  static constexpr int64_t kDenseRows = 4;  // the dot kernel's input rows
  bool lane_dense_ = false;
  int64_t dense_width_ = 0;     // widest output of those stages
  int64_t features_ = 0;        // the last spatial stage's output per image
  float* lane_block_ = nullptr;  // in the arena: lanes x kDenseRows x features_
  std::vector<float> dense_buf_;  // lanes x 2 x kDenseRows x dense_width_
  void run_dense_block(int lane, const int64_t* images, int64_t rows, float* y);
  int lanes_ = 1;
  // Tile mode whose last stage writes the output, over kStreamOutBytes of it:
  // each image's output goes to the lane's buffer, then to y with streaming
  // stores (stream_out).
  bool stream_out_ = false;
  int64_t lane_elems_ = 0, batch_elems_ = 0, arena_elems_ = 0;
  AlignedPtr<float> arena_;
  double predicted_s_ = 0;
  std::string mode_why_;
};

NetPlan::NetPlan(const std::vector<NetLayerSpec>& layers, const Shape& batched) : in_batched_(batched) {
  LK_CHECK(!batched.empty(), "input: expected a batch dimension");
  N_ = batched[0];
  threads_ = get_num_threads();
  const Shape per_image(batched.begin() + 1, batched.end());
  Builder b{layers, {}, {}};
  std::vector<Stage> built = b.build(per_image);
  out_batched_ = {N_};
  out_batched_.insert(out_batched_.end(), b.result.begin(), b.result.end());
  for (Stage& s : built) {
    Planned p;
    p.s = std::move(s);
    stages_.push_back(std::move(p));
  }
  while (spatial_ < stages_.size() && stages_[spatial_].s.spatial()) ++spatial_;

  // Tile mode when every thread gets at least two images (one thread: any
  // batch above one), or when layer mode's batch-sized intermediates would
  // not fit the memory budget.
  int64_t per_image_max = 0;
  for (size_t i = 0; i + 1 < spatial_; ++i) per_image_max = std::max(per_image_max, numel(stages_[i].s.out));
  const int64_t layer_bytes = 2 * N_ * per_image_max * static_cast<int64_t>(sizeof(float));
  const int64_t budget = scheduler_settings().memory_budget;
  if (spatial_ > 0 && N_ > 1) {
    if (threads_ == 1) tile_ = true, mode_why_ = "one thread: image by image keeps intermediates in cache";
    else if (N_ >= 2 * threads_) tile_ = true, mode_why_ = cat("batch ", N_, " >= 2 x ", threads_, " threads");
    else if (layer_bytes > budget) tile_ = true, mode_why_ = "batch-sized intermediates exceed the memory budget";
  }
  if (!tile_) mode_why_ = spatial_ == 0 ? "no convolutional stages" : cat("batch ", N_, " < 2 x ", threads_, " threads");
  lanes_ = tile_ ? static_cast<int>(std::min<int64_t>(threads_, N_)) : 1;
  // The split saves the linear stage's hand-off to the threads and its wait
  // for the slowest, and each thread streams only its share of the weights.
  // The dot kernel takes up to 4 input rows at once: batches up to 4.
  split_ = !tile_ && threads_ > 1 && N_ <= 4 && stages_.size() >= 2 && stages_[0].s.kind == StageKind::direct &&
           stages_[0].s.hwc_out && stages_[1].s.kind == StageKind::linear && stages_[1].s.hwc_in;

  for (size_t i = 0; i < stages_.size(); ++i) plan_stage(stages_[i], tile_ && i < spatial_ ? 1 : N_);
  // Only when the direct stage was worth running on the threads anyway (the
  // hand-off is paid once), and the linear reads its weights as rows.
  if (split_ && (stages_[0].threads < 2 || stages_[1].linear->weight_layout() != 0)) split_ = false;
  if (split_) {
    split_fused_ = stages_[0].s.wino <= 1 && stages_[1].s.out.back() <= kDirDenseMax;
    stages_[0].plan += cat(" split with the next stage's features over ", threads_, " threads",
                           split_fused_ ? ", which it takes in its epilogue" : "");
    partial_.assign(static_cast<size_t>(threads_ * N_ * stages_[1].s.out.back()), 0.0f);
  }
  lane_dense_ = tile_ && spatial_ > 0 && spatial_ < stages_.size();
  // A lane reads every weight of those stages per block (the dot plan's
  // threads each read their share): only while they stay in its L2 beside
  // its images. 512 KB: half the L2 of the cores measured (1 MB on Zen 4).
  constexpr int64_t kLaneDenseBytes = 512 * 1024;
  int64_t dense_bytes = 0;
  for (size_t i = spatial_; i < stages_.size() && lane_dense_; ++i) {
    const Planned& p = stages_[i];
    lane_dense_ = p.s.kind == StageKind::linear && p.s.in.size() == 1 && p.linear->weight_layout() == 0;
    dense_width_ = std::max(dense_width_, p.s.out.back());
    dense_bytes += p.s.in.back() * p.s.out.back() * static_cast<int64_t>(sizeof(float));
  }
  if (dense_bytes > kLaneDenseBytes) lane_dense_ = false;
  if (lane_dense_) {
    features_ = round_up(numel(stages_[spatial_ - 1].s.out), 16);
    dense_buf_.assign(static_cast<size_t>(lanes_ * 2 * kDenseRows * dense_width_), 0.0f);
    mode_why_ += cat("; stages ", spatial_, "-", stages_.size() - 1, " run in the lanes on every ", kDenseRows,
                     " images a lane takes");
  }

  // Arena: per lane, two per-image buffers for the tile stages' intermediates;
  // two batch-sized buffers for everything else that is not the output
  // (lane_dense_: the lanes' blocks instead, for the last spatial stage's
  // output, and nothing batch-sized after it).
  lane_elems_ = 0, batch_elems_ = 0;
  for (size_t i = 0; i + 1 < stages_.size(); ++i) {
    const int64_t e = numel(stages_[i].s.out);
    if (tile_ && i + 1 < spatial_)
      lane_elems_ = std::max(lane_elems_, round_up(e, 16));
    else if (!lane_dense_)
      batch_elems_ = std::max(batch_elems_, round_up(N_ * e, 16));
  }
  const int64_t out_elems = numel(stages_.back().s.out);
  stream_out_ = tile_ && spatial_ == stages_.size() &&
                N_ * out_elems * static_cast<int64_t>(sizeof(float)) > kStreamOutBytes;
  if (stream_out_) lane_elems_ = std::max(lane_elems_, round_up(out_elems, 16));
  const int64_t block_elems = lane_dense_ ? lanes_ * kDenseRows * features_ : 0;
  arena_elems_ = 2 * lanes_ * lane_elems_ + 2 * batch_elems_ + block_elems;
  if (arena_elems_ > 0) {
    arena_ = aligned_alloc_array<float>(static_cast<size_t>(arena_elems_));
    g_arenas.fetch_add(1, std::memory_order_relaxed);
  }
  lane_block_ = arena_.get() + 2 * lanes_ * lane_elems_ + 2 * batch_elems_;

  predicted_s_ = 0;
  for (size_t i = 0; i < stages_.size(); ++i)
    predicted_s_ += tile_ && i < spatial_ ? stages_[i].predicted_s * static_cast<double>(ceil_div(N_, lanes_))
                                          : stages_[i].predicted_s;
  if (tile_ && lanes_ > 1) predicted_s_ += machine_model().wake_s;
  if (split_ && stages_[1].threads > 1) predicted_s_ -= machine_model().wake_s;  // one hand-off for both
  for (size_t i = spatial_; i < stages_.size() && lane_dense_; ++i)  // in the lanes: no hand-offs of their own
    if (stages_[i].threads > 1) predicted_s_ -= machine_model().wake_s;
}

void NetPlan::plan_stage(Planned& p, int64_t images) {
  Stage& s = p.s;
  const MachineModel& m = machine_model();
  switch (s.kind) {
    case StageKind::direct: {
      const Conv2dDesc& d = s.conv;
      const int64_t K = d.K, taps = d.C * d.R * d.S;
      p.dw = aligned_alloc_array<float>(static_cast<size_t>(taps * K));
      const float* w = s.layer->weight.data();  // K x C x R x S
      // Taps in the order the input is laid out: (c, r, s) for planes,
      // (r, s, c) for interleaved channels (consecutive taps, consecutive
      // addresses; F(4x4) interleaves planes in its band copy).
      std::vector<int64_t> order;  // tap -> index into C x R x S
      for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
          for (int64_t q = 0; q < d.S; ++q) order.push_back((c * d.R + r) * d.S + q);
      const bool interleaved = s.hwc_in || s.wino >= 2;
      if (interleaved)
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return a % (d.R * d.S) < b % (d.R * d.S);
        });
      if (s.wino == 4) {
        // U = G g G^T per channel and filter, in double, stored 36 x C x K.
        static const double G[6][3] = {{0.25, 0, 0},
                                       {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                       {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                       {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                       {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                       {0, 0, 1}};
        p.uw = aligned_alloc_array<float>(static_cast<size_t>(36 * d.C * K));
        for (int64_t c = 0; c < d.C; ++c)
          for (int64_t k = 0; k < K; ++k) {
            const float* g = w + (k * d.C + c) * 9;
            double gg[6][3];  // G g
            for (int r = 0; r < 6; ++r)
              for (int q = 0; q < 3; ++q) gg[r][q] = G[r][0] * g[q] + G[r][1] * g[3 + q] + G[r][2] * g[6 + q];
            for (int r = 0; r < 6; ++r)
              for (int q = 0; q < 6; ++q)
                p.uw[((r * 6 + q) * d.C + c) * K + k] =
                    static_cast<float>(gg[r][0] * G[q][0] + gg[r][1] * G[q][1] + gg[r][2] * G[q][2]);
          }
      }
      if (s.wino == 2) {
        // U = G g G^T per channel and filter, in double, in blocks of 32
        // filters (DirectConvArgs::wino_w).
        p.uw = aligned_alloc_array<float>(static_cast<size_t>(16 * d.C * K));
        for (int64_t c = 0; c < d.C; ++c)
          for (int64_t k = 0; k < K; ++k) {
            const float* g = w + (k * d.C + c) * 9;
            double gg[4][3];  // G g, G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
            for (int q = 0; q < 3; ++q) {
              const double g0 = g[q], g1 = g[3 + q], g2 = g[6 + q];
              gg[0][q] = g0, gg[1][q] = 0.5 * (g0 + g1 + g2), gg[2][q] = 0.5 * (g0 - g1 + g2), gg[3][q] = g2;
            }
            for (int r = 0; r < 4; ++r) {
              const double u[4] = {gg[r][0], 0.5 * (gg[r][0] + gg[r][1] + gg[r][2]),
                                   0.5 * (gg[r][0] - gg[r][1] + gg[r][2]), gg[r][2]};
              const int64_t kb = k / 32 * 32, width = std::min<int64_t>(32, K - kb);
              for (int q = 0; q < 4; ++q)
                p.uw[16 * d.C * kb + ((r * 4 + q) * d.C + c) * width + k - kb] = static_cast<float>(u[q]);
            }
          }
      }
      for (int64_t t = 0; t < taps; ++t)  // Winograd's stages too: the taps take inputs it may not
        for (int64_t k = 0; k < K; ++k) p.dw[t * K + k] = w[k * taps + order[t]];
      if (s.wino == 1 || s.planes_wino) {
        // G g per filter row, G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], in
        // double: wino 1 in groups of 16 filters, C x 3 x 4 x 16 each; the
        // planes kernel K x C x 3 x 4 (DirectConvArgs::planes_wino).
        p.uw = aligned_alloc_array<float>(static_cast<size_t>(12 * d.C * K));
        for (int64_t c = 0; c < d.C; ++c)
          for (int64_t k = 0; k < K; ++k)
            for (int r = 0; r < 3; ++r) {
              const float* g = w + ((k * d.C + c) * 3 + r) * 3;
              const double g0 = g[0], g1 = g[1], g2 = g[2];
              const double u[4] = {g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2};
              for (int j = 0; j < 4; ++j)
                p.uw[s.wino == 1 ? k / 16 * 12 * d.C * 16 + ((c * 3 + r) * 4 + j) * 16 + k % 16
                                 : ((k * d.C + c) * 3 + r) * 4 + j] = static_cast<float>(u[j]);
            }
      }
      if (s.phases_wino) {
        // G g per filter row and column phase (the even columns' 4 taps, the
        // odd ones' 3 and a zero), for the points 0, 1, -1, 2, -2, 1/2 and
        // infinity, in double, in blocks of 4 filters
        // (DirectConvArgs::phases_wino).
        static const double G[7][4] = {{-0.5, 0, 0, 0},
                                       {-1.0 / 3, -1.0 / 3, -1.0 / 3, -1.0 / 3},
                                       {1.0 / 9, -1.0 / 9, 1.0 / 9, -1.0 / 9},
                                       {1.0 / 36, 2.0 / 36, 4.0 / 36, 8.0 / 36},
                                       {-1.0 / 60, 2.0 / 60, -4.0 / 60, 8.0 / 60},
                                       {32.0 / 45, 16.0 / 45, 8.0 / 45, 4.0 / 45},
                                       {0, 0, 0, 1}};
        p.uw = aligned_alloc_array<float>(static_cast<size_t>(14 * d.C * d.R * K));
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < d.C; ++c)
            for (int64_t r = 0; r < d.R; ++r) {
              const float* g = w + ((k * d.C + c) * d.R + r) * 7;
              for (int h = 0; h < 2; ++h) {
                const double t[4] = {g[h], g[h + 2], g[h + 4], h ? 0.0 : g[6]};
                for (int j = 0; j < 7; ++j)
                  p.uw[(((k / 4 * d.C + c) * d.R + r) * 14 + h * 7 + j) * 4 + k % 4] =
                      static_cast<float>(G[j][0] * t[0] + G[j][1] * t[1] + G[j][2] * t[2] + G[j][3] * t[3]);
              }
            }
      }
      if (d.has_bias) {
        p.dbias = aligned_alloc_array<float>(static_cast<size_t>(K));
        std::copy(s.layer->bias.begin(), s.layer->bias.end(), p.dbias.get());
      }
      {
        // Inputs up to x_bound in magnitude keep every sum within 2e37: no
        // sum of a filter overflows, so none is NaN unless an input is.
        double most = 0;  // the largest sum of |weights| + |bias| of a filter
        for (int64_t k = 0; k < K; ++k) {
          double sum = d.has_bias ? std::fabs(static_cast<double>(s.layer->bias[k])) : 0.0;
          for (int64_t t = 0; t < taps; ++t) sum += std::fabs(static_cast<double>(w[k * taps + t]));
          most = std::max(most, sum);
        }
        p.x_bound = most < 1e37 ? static_cast<float>(std::min(1e37 / std::max(most, 1e-30), 3e38)) : 0.0f;
      }
      p.fn = direct_conv_f32(active_isa());
      const int64_t P = s.out[1], convP = d.P();
      const double wino_fmas = s.wino == 4 ? 9 : s.wino == 2 ? 4 : 24;  // per output, channel and filter
      const double flops = s.wino          ? 2.0 * images * K * wino_fmas * d.C * P * s.out[2]
                           : s.phases_wino ? 2.0 * images * K * phases_wino_ops(d) * convP * d.Q()
                                           : 2.0 * images * K * taps * convP * d.Q();
      const double rate = s.wino == 4     ? kWino4Efficiency
                          : s.wino == 2   ? kWino2Efficiency
                          : s.wino == 1   ? kWinoRowEfficiency
                          : s.phases_wino ? kWinoPhaseEfficiency
                                          : direct_efficiency(taps);
      const double one = flops / (m.gemm_flops[0][0] * rate);
      // Image by image in a lane (tile mode), the stage has its thread alone.
      const bool lane = tile_ && images == 1;
      p.threads = !lane && threads_ > 1 && images * P > 1 && one / threads_ + m.wake_s < one ? threads_ : 1;
      // Bands of output rows: one per image in tile mode; in layer mode
      // enough for every thread to get a few.
      int64_t bands = 1;
      if (p.threads > 1) bands = std::min<int64_t>(P, ceil_div(4 * p.threads, images));
      p.rows_per_band = ceil_div(P, bands);
      // A Winograd tile covers two output rows (F(4x4): pooled rows): bands of
      // one would compute each tile for half its outputs.
      if (s.wino >= 2) p.rows_per_band = round_up(p.rows_per_band, 2);
      p.predicted_s = 0;
      if (s.wino == 2) {
        // Each task (image, band of rows, group of filters) reads its group's
        // transformed filters once per block of tiles: where images and rows
        // are few, threads split the filters instead of the rows (512 -> 512
        // channels on 7x7: two groups of 256 over the image's 16 tiles, not
        // four bands of 4 tiles each reading all 16.8 MB).
        const int64_t tc = ceil_div(s.out[2], 2), B = wino2_block_tiles(d.C);
        const double u_bytes = 16.0 * d.C * K * sizeof(float);
        p.predicted_s = std::numeric_limits<double>::infinity();
        for (int64_t r = 2; r <= round_up(P, 2); r += 2) {
          if (!s.hwc_out && r > 2 && r * s.out[2] * K * static_cast<int64_t>(sizeof(float)) > kWino2BandBytes) break;
          const int64_t tiles = r / 2 * tc, blocks = ceil_div(tiles, B);
          const int64_t computed = tiles / B * B + round_up(tiles % B, 8);  // whole products of 8 tiles
          for (int64_t g = 1; g <= p.threads; ++g) {
            if (g > 1 && K % (32 * g) != 0) continue;  // equal groups of whole 32-filter blocks
            const double task = 32.0 * d.C * (K / g) * computed / (m.gemm_flops[0][0] * kWino2Efficiency) +
                                u_bytes / g * blocks / kL3Rate;
            const double t = task * ceil_div(images * ceil_div(P, r) * g, p.threads);
            if (t < p.predicted_s * 0.999) p.predicted_s = t, p.rows_per_band = r, p.k_groups = g;
          }
        }
      }
      // split_: each thread an equal run of pixels, at most this many whole rows
      if (split_ && &p == &stages_[0] && p.threads > 1) {
        p.rows_per_band = std::max<int64_t>(1, ceil_div(P * s.out[2], threads_) / s.out[2]);
        p.k_groups = 1;
        p.predicted_s = 0;
      }
      if (p.predicted_s == 0)
        p.predicted_s = one / p.threads * imbalance(images * ceil_div(P, p.rows_per_band), p.threads);
      const int64_t conv_rows = s.pooled() ? 2 * p.rows_per_band : p.rows_per_band;
      p.band_rows = (conv_rows - 1) * d.stride_h + (d.R - 1) * d.dil_h + 1;
      p.Wp = d.W + d.pad_left + d.pad_right;
      if (s.planes_out && d.stride_w > 1) {  // Wp: a phase plane's row
        p.phases = d.stride_w;
        p.Wp = ceil_div(p.Wp, p.phases);
      }
      if (s.wino >= 2) {  // whole patches: rows and columns of whole tiles, zeros past the input
        p.band_rows = wino_rows(s, p.rows_per_band);
        p.Wp = std::max(p.Wp, wino_rows(s, s.out[2]));
      }
      const int64_t plane = p.band_rows * p.Wp;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t c = order[t] / (d.R * d.S), r = order[t] / d.S % d.R, q = order[t] % d.S;
        const int64_t col = q * d.dil_w;
        const int64_t pixel = r * d.dil_h * p.Wp + col / p.phases;
        p.taps.push_back(interleaved ? pixel * d.C + c : (c * p.phases + col % p.phases) * plane + pixel);
      }
      if (p.threads > 1) p.predicted_s += m.wake_s;
      // Pixels per block: 12 for pooled stride-1 convolutions over planes
      // with AVX-512 (conv_direct.inc's kDirPooledUnit), else 8 or 4.
      const bool unit = s.pooled() && d.stride_w == 1 && (!s.hwc_in || d.C == 1);
      const int tiles = active_isa() == Isa::avx512 ? (unit ? 12 : 8) : 4;
      p.plan = s.wino == 4 ? cat("winograd F(4x4,3x3) pooled per tile ukernel=f32_conv_wino4_4__",
                                 isa_name(active_isa()), " channels=", d.C, " filters=", K)
               : s.wino == 2 ? cat("winograd F(2x2,3x3) ukernel=f32_conv_wino2_", active_isa() == Isa::avx512 ? 8 : 4,
                                   "__", isa_name(active_isa()), " channels=", d.C, " filters=", K)
               : s.wino == 1
                   ? cat("winograd F(2,3) on rows pooled per tile ukernel=f32_conv_wino_row_2x16__",
                         isa_name(active_isa()), " planes=", d.C, " filters=", K,
                         " (taps for inputs not finite or over ", p.x_bound, ")")
               : s.planes_wino
                   ? cat("winograd F(2,3) on rows pixels in lanes ukernel=f32_conv_planes_wino_3x2__",
                         isa_name(active_isa()), " planes=", d.C, " filters=", K,
                         " (taps for inputs not finite or over ", p.x_bound, ")")
               : s.phases_wino
                   ? cat("winograd F(4,4) on column phases pixels in lanes ukernel=f32_conv_phases_wino_4x1__",
                         isa_name(active_isa()), " planes=", d.C, " filters=", K,
                         " (taps for inputs not finite or over ", p.x_bound * kWino4Shrink, ")")
               : s.planes_out ? cat("direct pixels in lanes ukernel=f32_conv_planes_",
                                    active_isa() == Isa::avx512 ? "3x8" : "2x4", "__", isa_name(active_isa()),
                                    " taps=", taps, " filters=", K)
                      : cat("direct ukernel=f32_conv_direct_", tiles, "x", K >= 32 ? 32 : 16, "__",
                            isa_name(active_isa()), " taps=", taps, " filters=", K);
      p.plan += cat(s.hwc_in ? " in=pixels_x_channels" : "", s.hwc_out ? " out=pixels_x_channels" : " out=nchw",
                    " rows_per_task=", p.rows_per_band, p.k_groups > 1 ? cat(" filter_groups=", p.k_groups) : "",
                    " threads=", p.threads, " predicted_us=", p.predicted_s * 1e6);
      break;
    }
    case StageKind::conv:
    case StageKind::conv_pool: {
      Conv2dDesc d = s.conv;
      d.N = images;
      d.act = s.act;
      const Conv2dPlan<float>* cp;
      if (s.kind == StageKind::conv_pool) {
        p.conv_pool = plan_conv2d_max_pool2d<float>(d, *s.pool, true, s.layer->only);
        cp = &p.conv_pool->conv();
        p.plan = p.conv_pool->describe();
        // Bands of pooled rows as tall as a quarter of L2 allows, and in layer
        // mode enough of them for every thread (the pool plan's own bands are
        // cut into four per thread: too short for the GEMM's pixel tiles).
        const int64_t row_bytes = d.K * s.pool->stride_h * d.Q() * 4, P = s.out[1];
        int64_t rows = std::clamp<int64_t>(256 * 1024 / std::max<int64_t>(row_bytes, 1), 1, P);
        const int t = tile_ && images == 1 ? 1 : cp->threads();  // tile mode: one image per lane
        if (t > 1 && images < t) rows = std::min(rows, ceil_div(P, ceil_div(t, images)));
        p.pooled_rows_per_band = rows;
      } else {
        p.conv = plan_conv2d<float>(d, true, nullptr, s.layer->only);
        cp = p.conv.get();
        p.plan = p.conv->describe();
      }
      TensorView w;
      w.data = const_cast<float*>(s.layer->weight.data());
      w.ndim = 4;
      w.shape[0] = d.K, w.shape[1] = d.Cg(), w.shape[2] = d.R, w.shape[3] = d.S;
      w.strides[3] = 1, w.strides[2] = d.S, w.strides[1] = d.R * d.S, w.strides[0] = d.Cg() * d.R * d.S;
      TensorView b;
      b.data = const_cast<float*>(s.layer->bias.data());
      b.ndim = 1, b.shape[0] = d.K, b.strides[0] = 1;
      p.cpacked = cp->pack(w, d.has_bias ? &b : nullptr);
      p.cw = cp->bind(p.cpacked);
      p.threads = cp->threads();
      p.predicted_s = cp->choice().time_s;
      if (s.kind == StageKind::conv_pool) p.plan += cat(" pooled_rows_per_band=", p.pooled_rows_per_band);
      break;
    }
    case StageKind::linear: {
      const NetLayerSpec& l = *s.layer;
      LinearDesc d;
      d.M = images * numel(Shape(s.in.begin(), s.in.end() - 1));
      d.K = l.in_features, d.N = l.out_features;
      d.has_bias = l.has_bias;
      d.act = s.act;
      // The split and the lanes' dense stages read the weight as rows: the
      // panels only for one row, and not for the split while the weight
      // stays in L2 (1 MB on Zen 4); past that they stream faster than the
      // split saves.
      const bool split_rows = split_ && &p == &stages_[1] && d.K * d.N * int64_t{4} < (int64_t{1} << 20);
      p.linear = plan_linear<float>(d, true, d.M == 1 && !split_rows);
      std::vector<float> permuted;
      const float* wsrc = l.weight.data();
      if (s.hwc_in) {  // columns (c, h, w) -> ((h, w), c), as the direct stage lays its output out
        const int64_t C = s.hwc_shape[0], HW = s.hwc_shape[1] * s.hwc_shape[2];
        permuted.resize(l.weight.size());
        for (int64_t j = 0; j < d.N; ++j)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t hw = 0; hw < HW; ++hw) permuted[j * d.K + hw * C + c] = wsrc[j * d.K + c * HW + hw];
        wsrc = permuted.data();
      }
      TensorView w;
      w.data = const_cast<float*>(wsrc);
      w.ndim = 2, w.shape[0] = d.N, w.shape[1] = d.K, w.strides[0] = d.K, w.strides[1] = 1;
      TensorView b;
      b.data = const_cast<float*>(l.bias.data());
      b.ndim = 1, b.shape[0] = d.N, b.strides[0] = 1;
      p.lpacked = p.linear->pack(w, d.has_bias ? &b : nullptr);
      p.lw = p.linear->bind(p.lpacked);
      p.threads = p.linear->threads();
      p.predicted_s = p.linear->predicted_s();
      p.plan = p.linear->describe();
      if (s.hwc_in) p.plan += " in=pixels_x_channels";
      if (s.softmax_after) p.plan += s.softmax_after == 2 ? " then log_softmax per row" : " then softmax per row";
      break;
    }
    case StageKind::pool: {
      const double bytes = 4.0 * images * (numel(s.in) + numel(s.out));
      p.predicted_s = bytes / bandwidth();
      p.plan = cat("max_pool2d ", s.pool->kh, "x", s.pool->kw, " stride ", s.pool->stride_h, "x", s.pool->stride_w);
      break;
    }
    case StageKind::relu:
    case StageKind::softmax: {
      p.predicted_s = 8.0 * images * numel(s.in) / bandwidth();
      p.plan = s.kind == StageKind::relu ? "relu" : cat(s.log ? "log_softmax" : "softmax", " over ", s.dim);
      break;
    }
  }
}

TensorView NetPlan::view(const float* data, const Shape& per_image, int64_t images) const {
  TensorView v;
  v.data = const_cast<float*>(data);
  v.ndim = static_cast<int>(per_image.size()) + 1;
  v.shape[0] = images;
  for (size_t i = 0; i < per_image.size(); ++i) v.shape[i + 1] = per_image[i];
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) v.strides[d] = stride, stride *= v.shape[d];
  return v;
}

void NetPlan::run_direct(const Planned& p, const TensorView& x, float* y, int64_t images) const {
  const int64_t P = p.s.out[1];
  const int64_t bands = ceil_div(P, p.rows_per_band);
  parallel_for(images * bands * p.k_groups, p.threads, [&](int64_t t) {
    const int64_t n = t / p.k_groups / bands, p0 = t / p.k_groups % bands * p.rows_per_band;
    direct_band(p, x, y, n, p0, std::min(P, p0 + p.rows_per_band), 0, p.s.out[2], nullptr, t % p.k_groups);
  });
}

// Output pixels [s, e) of image n in raster order (pooled ones when pooled):
// a partial first row, whole rows, a partial last row.
void NetPlan::direct_pixels(const Planned& p, const TensorView& x, float* y, int64_t n, int64_t s, int64_t e,
                           const DenseFuse* fuse) const {
  const int64_t Q = p.s.out[2];
  while (s < e) {
    const int64_t r = s / Q, q0 = s % Q;
    if (q0 > 0 || e - s < Q) {  // within one row
      const int64_t q1 = std::min(Q, q0 + e - s);
      direct_band(p, x, y, n, r, r + 1, q0, q1, fuse);
      s += q1 - q0;
    } else {
      const int64_t rows = (e - s) / Q;
      direct_band(p, x, y, n, r, r + rows, 0, Q, fuse);
      s += rows * Q;
    }
  }
}

// Pooled (or plain) output rows [p0, p1), columns [q0, q1), of image n.
void NetPlan::direct_band(const Planned& p, const TensorView& x, float* y, int64_t n, int64_t p0, int64_t p1,
                          int64_t q0, int64_t q1, const DenseFuse* fuse, int64_t group) const {
  const Stage& s = p.s;
  const Conv2dDesc& d = s.conv;
  const int64_t C = d.C, H = d.H, W = d.W, K = d.K, P = s.out[1], Q = s.out[2];
  const int64_t Wp = p.Wp, plane = p.band_rows * Wp;
  const bool pool = s.pooled();
  const int64_t cr0 = pool ? 2 * p0 : p0, cr1 = pool ? 2 * p1 : p1;  // convolution rows
  const int64_t rows = s.wino >= 2 ? wino_rows(s, p1 - p0)  // whole patches
                                   : (cr1 - 1 - cr0) * d.stride_h + (d.R - 1) * d.dil_h + 1;
  // The padded input rows this band reads, contiguous: the kernel's taps
  // then are fixed offsets.
  float* band = scratch_array<float>(kInputBandSlot, static_cast<size_t>(C * p.phases * plane));
  if (s.hwc_in) {  // pixels x channels from the direct stage before: whole padded rows
    const float* xn = x.ptr<float>() + n * H * W * C;
    const int64_t row = Wp * C;
    for (int64_t r = 0; r < rows; ++r) {
      float* o = band + r * row;
      const int64_t ih = cr0 * d.stride_h + r - d.pad_top;
      if (ih < 0 || ih >= H) {
        std::fill(o, o + row, 0.0f);
        continue;
      }
      std::fill(o, o + d.pad_left * C, 0.0f);
      std::memcpy(o + d.pad_left * C, xn + ih * W * C, static_cast<size_t>(W * C) * sizeof(float));
      std::fill(o + (d.pad_left + W) * C, o + row, 0.0f);
    }
  }
  const float* xn = x.ptr<float>() + n * x.strides[0];
  if (!s.hwc_in && s.wino >= 2)  // channel planes into Winograd's pixels x channels
    for (int64_t r = 0; r < rows; ++r) {
      float* o = band + r * Wp * C;
      const int64_t ih = cr0 * d.stride_h + r - d.pad_top;
      if (ih < 0 || ih >= H) {
        std::fill(o, o + Wp * C, 0.0f);
        continue;
      }
      std::fill(o, o + d.pad_left * C, 0.0f);
      std::fill(o + (d.pad_left + W) * C, o + Wp * C, 0.0f);
      const float* in = xn + ih * x.strides[2];
      if (x.strides[3] == 1) {  // C rows of W pixels, transposed in registers
        store_transposed(in, x.strides[1], C, W, o + d.pad_left * C, C);
        continue;
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < W; ++w) o[(d.pad_left + w) * C + c] = in[c * x.strides[1] + w * x.strides[3]];
    }
  // One unpadded plane of contiguous rows (a network's first layer on
  // grey images): the band is the input's own rows, read in place.
  const bool in_place = !s.hwc_in && s.wino <= 1 && C == 1 && d.pad_top == 0 && d.pad_bottom == 0 && d.pad_left == 0 &&
                        d.pad_right == 0 && x.strides[3] == 1 && x.strides[2] == W && p.phases == 1;
  // Column phases: padded column j to phase plane j % S, column j / S;
  // band rows [in0, in1) are input rows, the others padding.
  const int64_t ih0 = cr0 * d.stride_h - d.pad_top;  // band row 0's input row
  const int64_t in0 = std::clamp<int64_t>(-ih0, 0, rows), in1 = std::clamp<int64_t>(H - ih0, in0, rows);
  const SplitRowsFn split = split_rows_phases_f32(active_isa());
  for (int64_t c = 0; c < C && p.phases > 1; ++c) {
    float* o = band + c * p.phases * plane;
    const int64_t S = p.phases, step = x.strides[3];
    split(o, plane, Wp, S, nullptr, 0, step, W, d.pad_left, in0);
    if (in1 > in0)
      split(o + in0 * Wp, plane, Wp, S, xn + c * x.strides[1] + (ih0 + in0) * x.strides[2], x.strides[2], step, W,
            d.pad_left, in1 - in0);
    split(o + in1 * Wp, plane, Wp, S, nullptr, 0, step, W, d.pad_left, rows - in1);
  }
  for (int64_t c = 0; c < C && !s.hwc_in && s.wino < 2 && !in_place && p.phases == 1; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      float* o = band + c * plane + r * Wp;
      const int64_t ih = cr0 * d.stride_h + r - d.pad_top;
      if (ih < 0 || ih >= H) {
        std::fill(o, o + Wp, 0.0f);
        continue;
      }
      const float* in = xn + c * x.strides[1] + ih * x.strides[2];
      std::fill(o, o + d.pad_left, 0.0f);
      if (x.strides[3] == 1)
        std::memcpy(o + d.pad_left, in, static_cast<size_t>(W) * sizeof(float));
      else
        for (int64_t w = 0; w < W; ++w) o[d.pad_left + w] = in[w * x.strides[3]];
      std::fill(o + d.pad_left + W, o + Wp, 0.0f);
    }
  DirectConvArgs a;
  a.x = in_place ? xn + cr0 * d.stride_h * W : band;
  a.x_bound = p.x_bound;
  const bool interleaved = s.hwc_in || s.wino >= 2;
  if (interleaved)
    a.scan_blocks = 1, a.scan_len = rows * Wp * C;
  else if (in_place)
    a.scan_blocks = 1, a.scan_len = rows * W;
  else
    a.scan_blocks = C * p.phases, a.scan_len = rows * Wp, a.scan_stride = plane;
  a.Wp = Wp, a.pix = interleaved ? C : 1;
  a.tap_off = p.taps.data();
  a.taps = static_cast<int64_t>(p.taps.size());
  a.w = p.dw.get();
  a.bias = p.dbias.get();
  a.K = K;
  a.k_begin = group * (K / p.k_groups), a.k_end = a.k_begin + K / p.k_groups;
  a.stride_h = d.stride_h, a.stride_w = d.stride_w / p.phases;
  a.row0 = cr0;
  a.relu = s.act == Activation::relu;
  a.pool = pool;
  a.P = P, a.Q = Q, a.p0 = p0, a.p1 = p1, a.q0 = q0, a.q1 = q1;
  a.y = y + n * K * P * Q;
  a.hwc = s.hwc_out;
  a.planes_out = s.planes_out;
  a.planes_wino = s.planes_wino;
  a.phases_wino = s.phases_wino;
  a.R = d.R, a.dil_h = d.dil_h;
  a.tile = s.hwc_out || s.planes_out
               ? nullptr
               : scratch_array<float>(kTileSlot, static_cast<size_t>(round_up(p1 - p0, 2) * Q * K));  // the band's rows
  a.wino = s.wino;
  a.C = C;
  a.wino_w = p.uw.get();
  a.plane = plane;
  a.work = s.wino || s.planes_wino || s.phases_wino
               ? scratch_array<float>(kPackSlot, static_cast<size_t>(wino_work_floats(C)))
               : nullptr;
  if (fuse != nullptr) {
    a.dense_w = fuse->w, a.dense_ldw = fuse->ldw, a.dense_n = fuse->n, a.dense_acc = fuse->acc;
    a.store_y = false;  // the linear stage was its only reader
  }
  p.fn(a);
}

// lane_dense_: the lane's block (features of `rows` images) through the
// linear stages, in the lane's buffers; the last one's rows go to the images'
// rows of y.
void NetPlan::run_dense_block(int lane, const int64_t* images, int64_t rows, float* y) {
  const DenseRowsFn dense = dense_rows_f32(active_isa());
  float* buf[2] = {dense_buf_.data() + (2 * lane) * kDenseRows * dense_width_,
                   dense_buf_.data() + (2 * lane + 1) * kDenseRows * dense_width_};
  const float* x = lane_block_ + lane * kDenseRows * features_;
  int64_t ldx = features_;
  for (size_t i = spatial_; i < stages_.size(); ++i) {
    const Planned& p = stages_[i];
    const int64_t K = p.s.in.back(), Nout = p.s.out.back();
    float* out = buf[(i - spatial_) % 2];
    dense({K, x, ldx, static_cast<int>(rows), p.lpacked.w.get(), K, Nout, out, Nout, p.lpacked.bias.get(),
           p.s.act == Activation::relu});
    if (p.s.softmax_after) softmax<float>(out, out, rows, Nout, 1, p.s.softmax_after == 2);
    x = out, ldx = Nout;
  }
  const int64_t Nout = stages_.back().s.out.back();
  for (int64_t r = 0; r < rows; ++r) std::memcpy(y + images[r] * Nout, x + r * Nout, sizeof(float) * Nout);
}

// split_: stage 0's rows and stage 1's features in one hand-off to the threads.
void NetPlan::run_split(const TensorView& x, float* y0, float* y1) {
  const Planned& conv = stages_[0];
  const Planned& lin = stages_[1];
  const int64_t PQ = conv.s.out[1] * conv.s.out[2], K = conv.s.conv.K, F = PQ * K;  // features per image
  const int64_t Nout = lin.s.out.back();
  const int T = threads_;
  const DenseRowsFn dense = dense_rows_f32(active_isa());
  parallel_for(T, T, [&](int64_t t) {
    // An equal run of output pixels each (pixels x channels: a run of features).
    const int64_t s = PQ * t / T, e = PQ * (t + 1) / T;
    float* part = partial_.data() + t * N_ * Nout;
    if (s >= e) {
      std::fill(part, part + N_ * Nout, 0.0f);
      return;
    }
    if (split_fused_) {
      float acc[kDirDenseMax * kDirAccStride];
      const DenseFuse fuse{lin.lpacked.w.get(), F, Nout, acc};
      for (int64_t n = 0; n < N_; ++n) {
        std::fill(acc, acc + Nout * kDirAccStride, 0.0f);
        direct_pixels(conv, x, y0, n, s, e, &fuse);
        for (int64_t j = 0; j < Nout; ++j) {
          float v = 0;
          for (int64_t l = 0; l < kDirAccStride; ++l) v += acc[j * kDirAccStride + l];
          part[n * Nout + j] = v;
        }
      }
      return;
    }
    for (int64_t n = 0; n < N_; ++n) direct_pixels(conv, x, y0, n, s, e);
    dense({(e - s) * K, y0 + s * K, F, static_cast<int>(N_), lin.lpacked.w.get() + s * K, F, Nout, part, Nout,
           nullptr, false});
  });
  const float* bias = lin.lpacked.bias.get();
  for (int64_t n = 0; n < N_; ++n)
    for (int64_t j = 0; j < Nout; ++j) {
      float v = bias ? bias[j] : 0.0f;
      for (int t = 0; t < T; ++t) v += partial_[(t * N_ + n) * Nout + j];
      y1[n * Nout + j] = lin.s.act == Activation::relu && v < 0.0f ? 0.0f : v;
    }
  if (lin.s.softmax_after) softmax<float>(y1, y1, N_, Nout, 1, lin.s.softmax_after == 2);
}

// Bands of convolution rows computed into a buffer that stays in L2 and
// pooled at once: the full-resolution convolution output is never stored.
void NetPlan::run_conv_pool_bands(const Planned& p, const TensorView& x, float* y, int64_t images) const {
  const Pool2dDesc& pool = *p.s.pool;
  const Conv2dPlan<float>& conv = p.conv_pool->conv();
  const int64_t K = p.s.conv.K, CP = pool.H, CQ = pool.W, P = pool.P(), Q = pool.Q();
  const int64_t bands = ceil_div(P, p.pooled_rows_per_band);
  parallel_for(images * bands, p.threads, [&](int64_t task) {
    const int64_t n = task / bands, p0 = (task % bands) * p.pooled_rows_per_band;
    const int64_t p1 = std::min(P, p0 + p.pooled_rows_per_band);
    const int64_t r0 = std::max<int64_t>(0, p0 * pool.stride_h - pool.pad_h);
    const int64_t r1 = std::min(CP, (p1 - 1) * pool.stride_h - pool.pad_h + (pool.kh - 1) * pool.dil_h + 1);
    const int64_t band = std::max<int64_t>(0, r1 - r0) * CQ;
    float* buf = scratch_array<float>(kFusedBandSlot, static_cast<size_t>(K * band));
    conv.run_rows(x, p.cw, n, r0, r1, buf, band);
    for (int64_t k = 0; k < K; ++k)
      max_pool_rows(pool, buf + k * band, r0, CQ, int64_t{1}, p0, p1, y + ((n * K + k) * P + p0) * Q, nullptr);
  });
}

void NetPlan::run_stage(const Planned& p, const TensorView& in, float* out, int64_t images) const {
  const Stage& s = p.s;
  switch (s.kind) {
    case StageKind::direct:
      run_direct(p, in, out, images);
      return;
    case StageKind::conv:
      p.conv->run(in, p.cw, out);
      return;
    case StageKind::conv_pool:
      run_conv_pool_bands(p, in, out, images);
      return;
    case StageKind::pool: {
      Pool2dDesc d = *s.pool;
      d.N = images;
      max_pool2d<float>(d, in, out, nullptr);
      return;
    }
    case StageKind::relu:
      relu<float>(in.ptr<float>(), out, images * numel(s.in));
      return;
    case StageKind::softmax:
      softmax<float>(in.ptr<float>(), out, images * s.outer, s.dim, s.inner, s.log);
      return;
    case StageKind::linear: {
      const int64_t K = s.in.back(), M = images * numel(Shape(s.in.begin(), s.in.end() - 1)), Nout = s.out.back();
      TensorView x2;
      x2.data = in.data;
      x2.ndim = 2, x2.shape[0] = M, x2.shape[1] = K, x2.strides[0] = K, x2.strides[1] = 1;
      p.linear->run(x2, p.lw, out);
      if (s.softmax_after) softmax<float>(out, out, M, Nout, 1, s.softmax_after == 2);
      return;
    }
  }
}

void NetPlan::run(const TensorView& x, float* y) {
  const size_t n_stages = stages_.size();
  if (N_ == 0) return;
  if (n_stages == 0) {  // flattens and identities only: the input, copied
    std::memcpy(y, x.data, static_cast<size_t>(x.numel()) * sizeof(float));
    return;
  }
  float* lane_base = arena_.get();
  float* batch[2] = {arena_.get() + 2 * lanes_ * lane_elems_, arena_.get() + 2 * lanes_ * lane_elems_ + batch_elems_};
  size_t i = 0;
  if (tile_) {
    // Each lane (one per thread, with its own buffers) takes the next image
    // and sends it through every spatial stage before taking another: a lane
    // whose thread starts late, or is slowed by other work, takes fewer.
    std::atomic<int64_t> next{0};
    parallel_for(lanes_, lanes_, [&](int64_t lane) {
      float* buf[2] = {lane_base + 2 * lane * lane_elems_, lane_base + (2 * lane + 1) * lane_elems_};
      int64_t block[kDenseRows], rows = 0;  // lane_dense_: the images in the lane's block
      for (int64_t n; (n = next.fetch_add(1, std::memory_order_relaxed)) < N_;) {
        TensorView in = x;
        in.shape[0] = 1;
        in.data = const_cast<float*>(x.ptr<float>() + n * x.strides[0]);
        for (size_t k = 0; k < spatial_; ++k) {
          const Planned& p = stages_[k];
          float* out;
          if (k + 1 == spatial_ && lane_dense_)
            out = lane_block_ + (lane * kDenseRows + rows) * features_;
          else if (k + 1 == spatial_ && !stream_out_)
            out = (k + 1 == n_stages ? y : batch[k % 2]) + n * numel(p.s.out);
          else
            out = buf[k % 2];
          run_stage(p, in, out, 1);
          in = view(out, p.s.out, 1);
        }
        if (stream_out_) stream_copy(y + n * numel(stages_.back().s.out), in.ptr<float>(), numel(stages_.back().s.out));
        if (lane_dense_) {
          block[rows++] = n;
          if (rows == kDenseRows) run_dense_block(static_cast<int>(lane), block, rows, y), rows = 0;
        }
      }
      if (rows > 0) run_dense_block(static_cast<int>(lane), block, rows, y);
    });
    i = lane_dense_ ? n_stages : spatial_;
  }
  if (split_) {
    run_split(x, batch[0], n_stages == 2 ? y : batch[1]);
    i = 2;
  }
  TensorView in = x;
  if (i > 0) in = view(batch[(i - 1) % 2], stages_[i - 1].s.out, N_);
  for (; i < n_stages; ++i) {
    const Planned& p = stages_[i];
    float* out = i + 1 == n_stages ? y : batch[i % 2];
    run_stage(p, in, out, N_);
    in = view(out, p.s.out, N_);
  }
}

std::string NetPlan::describe() const {
  std::string s = cat("network plan for input ", shape_str(Shape(in_batched_.begin() + 1, in_batched_.end()), true),
                      " with N=", N_, " -> output ", shape_str(Shape(out_batched_.begin() + 1, out_batched_.end()), true),
                      ", float32, isa=", isa_name(active_isa()), ", threads=", threads_, "\n");
  if (tile_)
    s += cat("  mode: tile (stages 0-", spatial_ - 1, " run image by image; ", lanes_,
             " lanes, one per thread, taking the next image as they finish one, about ", ceil_div(N_, lanes_),
             " images each; ", mode_why_, stream_out_ ? "; the output streamed to memory image by image" : "",
             ")\n");
  else
    s += cat("  mode: layer (each stage over the whole batch, split across threads; ", mode_why_, ")\n");
  for (size_t i = 0; i < stages_.size(); ++i) {
    const Planned& p = stages_[i];
    std::string layers = p.s.first == p.s.last ? cat("layer ", p.s.first) : cat("layers ", p.s.first, "-", p.s.last);
    std::string fused = p.s.wino ? "conv2d(winograd)" : stage_name(p.s.kind);
    if (p.s.act == Activation::relu && (p.s.kind != StageKind::relu)) fused += "+relu";
    if (p.s.kind == StageKind::direct && p.s.pooled()) fused += "+max_pool2d";
    if (p.s.softmax_after) fused += p.s.softmax_after == 2 ? "+log_softmax" : "+softmax";
    s += cat("  stage ", i, " [", layers, "] ", fused, " ", shape_str(p.s.in, true), " -> ", shape_str(p.s.out, true),
             (tile_ && i < spatial_) ? " (per image)" : "", ": ", p.plan, "\n");
  }
  s += cat("  arena_bytes=", arena_bytes(), " (", lanes_, " lane(s) x 2 x ", lane_elems_ * 4, " + 2 x ",
           batch_elems_ * 4, lane_dense_ ? cat(" + ", lanes_, " lane block(s) x ", kDenseRows * features_ * 4) : "",
           ")\n");
  s += cat("  predicted_us=", predicted_s_ * 1e6);
  return s;
}

// ---------------------------------------------------------------------------

Network::Network(std::vector<NetLayerSpec> layers) : layers_(std::move(layers)) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const NetLayerSpec& l = layers_[i];
    const std::string where = cat("layer ", i, " (", l.name, "): ");
    if (l.op == NetOp::conv2d) {
      const Conv2dDesc& d = l.conv;
      LK_CHECK(d.K > 0 && d.C > 0 && d.R > 0 && d.S > 0 && d.groups > 0 && d.C % d.groups == 0 &&
                   d.K % d.groups == 0,
               where, "inconsistent convolution parameters");
      LK_CHECK(static_cast<int64_t>(l.weight.size()) == d.K * d.Cg() * d.R * d.S, where, "weight: wrong size");
      LK_CHECK(static_cast<int64_t>(l.bias.size()) == (d.has_bias ? d.K : 0), where, "bias: wrong size");
    } else if (l.op == NetOp::linear) {
      LK_CHECK(l.in_features >= 0 && l.out_features >= 0, where, "negative sizes");
      LK_CHECK(static_cast<int64_t>(l.weight.size()) == l.in_features * l.out_features, where, "weight: wrong size");
      LK_CHECK(static_cast<int64_t>(l.bias.size()) == (l.has_bias ? l.out_features : 0), where, "bias: wrong size");
    } else if (l.op == NetOp::max_pool2d) {
      LK_CHECK(l.pool.has_value(), where, "missing pooling parameters");
    }
  }
}

Network::~Network() = default;

std::shared_ptr<NetPlan> Network::plan_for(const std::vector<int64_t>& in) const {
  return plan_for(in.data(), static_cast<int>(in.size()));
}

std::shared_ptr<NetPlan> Network::plan_for(const int64_t* shape, int ndim) const {
  LK_CHECK(ndim >= 1 && ndim <= kMaxDims, "input: expected 1 to ", kMaxDims, " dimensions");
  const SchedulerSettings st = scheduler_settings();
  Key key;
  for (int i = 0; i < ndim; ++i) key.v[key.n++] = shape[i];
  int64_t weight_bits;
  std::memcpy(&weight_bits, &st.memory_weight, sizeof weight_bits);
  key.v[key.n++] = -1;  // separates the shape from the settings
  key.v[key.n++] = get_num_threads();
  key.v[key.n++] = static_cast<int64_t>(active_isa());
  key.v[key.n++] = st.memory_budget;
  key.v[key.n++] = weight_bits;
  std::lock_guard<std::mutex> lock(mu_);
  if (last_plan_ && key == last_key_) {
    plan_cache_count_kept(true);
    return last_plan_;
  }
  auto it = plans_.find(key);
  if (it != plans_.end()) {
    plan_cache_count_kept(true);
    last_key_ = key, last_plan_ = it->second;
    return it->second;
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto plan = std::make_shared<NetPlan>(layers_, std::vector<int64_t>(shape, shape + ndim));
  plan_cache_count_kept(false, std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now() - t0).count());
  constexpr size_t kMaxPlans = 16;  // batch sizes and settings kept per network
  if (plans_.size() >= kMaxPlans) plans_.erase(plans_.begin());
  plans_.emplace(key, plan);
  ++plans_made_;
  last_key_ = key, last_plan_ = plan;
  return plan;
}

const std::vector<int64_t>& Network::output_shape(const NetPlan& plan) { return plan.out_shape(); }

bool Network::starts_direct(const NetPlan& plan) { return plan.starts_direct(); }

std::string Network::describe(const NetPlan& plan) { return plan.describe(); }

std::vector<int64_t> Network::output_shape(const std::vector<int64_t>& in) const {
  return plan_for(in)->out_shape();
}

void Network::run(NetPlan& plan, const TensorView& x, float* y) {
  std::lock_guard<std::mutex> lock(plan.mu);
  plan.run(x, y);
}

void Network::run(const TensorView& x, float* y) const { run(*plan_for(x.shape, x.ndim), x, y); }

std::string Network::describe(const std::vector<int64_t>& in) const { return plan_for(in)->describe(); }

int64_t Network::arena_bytes(const std::vector<int64_t>& in) const { return plan_for(in)->arena_bytes(); }

bool Network::strided_input() const {
  for (const NetLayerSpec& l : layers_) {
    if (l.op == NetOp::identity) continue;
    return l.op == NetOp::conv2d || l.op == NetOp::max_pool2d;
  }
  return false;
}

int64_t Network::plans_made() const {
  std::lock_guard<std::mutex> lock(mu_);
  return plans_made_;
}

int64_t network_arena_allocations() { return g_arenas.load(std::memory_order_relaxed); }

}  // namespace lk::cpu
