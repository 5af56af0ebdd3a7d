// The fused convolution -> bias -> activation -> max-pool kernel.
//
// The grid tiles the pooled output: a block owns up to BM filters of one
// group and a rectangle of pooled outputs of one image. It computes every
// convolution output those pooling windows read (the tile's footprint,
// clipped to the convolution output) with the implicit-GEMM tile of
// conv2d.cu, BN footprint pixels at a time, keeps them in shared memory
// after bias and activation, then pools from there. Where windows overlap
// (stride below the kernel) neighbouring blocks recompute the shared halo
// rather than exchange it.
#include "cuda/conv_pool.cuh"

#include <algorithm>

#include "cuda/conv2d.cuh"
#include "cuda/conv_common.cuh"
#include "cuda/maxpool.cuh"
#include "cuda/pool_window.cuh"

namespace lk::cuda {

namespace {

// Footprint pixels per filter a block can hold: 32 KiB for BM filters.
template <class T>
constexpr int kFootprint = 128 * 4 / static_cast<int>(sizeof(T));
// Rows padded by 64 bytes: the two rows a warp stores to then start 16
// banks apart.
template <class T>
constexpr int kFootprintRow = kFootprint<T> + 64 / static_cast<int>(sizeof(T));

template <class T>
struct ConvPoolSmem {
  GemmSmem<T> gemm;
  SharedArray2<T, Gemm::BM, kFootprintRow<T>> conv;  // conv[filter][footprint pixel], after bias and activation
};

struct ConvPoolGrid {
  int tile_rows, tile_cols, tiles_per_row;
};

// Block (x, y, z): pooled tile x (row-major over tiles), filters
// [y * BM, +BM) of group z % groups, image z / groups.
template <class T>
__global__ void __launch_bounds__(Gemm::kThreads)
    conv_pool_kernel(ConvShape s, PoolShape ps, ConvPoolGrid tg, const T* __restrict__ x, const T* __restrict__ w,
                     const T* __restrict__ bias, T* __restrict__ y) {
  LK_SHARED(ConvPoolSmem<T>, sm);
  const int t = static_cast<int>(threadIdx.x);
  const int ty = t / (Gemm::BN / Gemm::TN), tx = t % (Gemm::BN / Gemm::TN);
  const int n = static_cast<int>(blockIdx.z) / s.groups, g = static_cast<int>(blockIdx.z) % s.groups;
  const int m0 = static_cast<int>(blockIdx.y) * Gemm::BM;
  const int op0 = static_cast<int>(blockIdx.x) / tg.tiles_per_row * tg.tile_rows;
  const int oq0 = static_cast<int>(blockIdx.x) % tg.tiles_per_row * tg.tile_cols;
  const int op1 = dev::min(op0 + tg.tile_rows, ps.P), oq1 = dev::min(oq0 + tg.tile_cols, ps.Q);

  // The footprint: convolution outputs [ch0, ch1) x [cw0, cw1) (ps.H x ps.W
  // is the convolution's P x Q; padding is never computed, never a candidate).
  const int ch0 = dev::max(op0 * ps.sh - ps.ph, 0);
  const int ch1 = dev::min((op1 - 1) * ps.sh - ps.ph + (ps.kh - 1) * ps.dh + 1, ps.H);
  const int cw0 = dev::max(oq0 * ps.sw - ps.pw, 0);
  const int cw1 = dev::min((oq1 - 1) * ps.sw - ps.pw + (ps.kw - 1) * ps.dw + 1, ps.W);
  const int fw = cw1 - cw0;
  const int pixels = (ch1 - ch0) * fw;
  const int k0 = g * s.Kg + m0;  // first filter of the block

  for (int c0 = 0; c0 < pixels; c0 += Gemm::BN) {
    ImColumn cols[kImColumns];
    LK_UNROLL
    for (int i = 0; i < kImColumns; ++i) {
      const int f = c0 + t % Gemm::kColsPerPass + i * Gemm::kColsPerPass;
      cols[i] = f < pixels ? im_column(s, n, g, ch0 + f / fw, cw0 + f % fw) : no_column();
    }
    T acc[Gemm::TM][Gemm::TN];
    conv_tile(sm.gemm, acc, x, w + k0 * s.CRS, s.Kg - m0, s, cols, t, ty, tx);

    // The epilogue of conv2d, into shared memory instead of global.
    LK_UNROLL
    for (int i = 0; i < Gemm::TM; ++i) {
      const int m = ty + i * (Gemm::BM / Gemm::TM);
      if (m0 + m >= s.Kg) continue;
      const T b = bias ? bias[k0 + m] : T(0);
      LK_UNROLL
      for (int j = 0; j < Gemm::TN; ++j) {
        const int f = c0 + tx + j * (Gemm::BN / Gemm::TN);
        if (f >= pixels) continue;
        const T v = acc[i][j] + b;
        sm.conv[m][f] = s.relu ? dev::relu(v) : v;
      }
    }
  }
  __syncthreads();  // the footprint is complete

  // Consecutive threads take consecutive pooled columns: coalesced stores.
  const int tile = tg.tile_rows * tg.tile_cols;
  for (int e = t; e < Gemm::BM * tile; e += Gemm::kThreads) {
    const int m = e / tile, o = e % tile;
    const int op = op0 + o / tg.tile_cols, oq = oq0 + o % tg.tile_cols;
    if (m0 + m >= s.Kg || op >= ps.P || oq >= ps.Q) continue;
    int index;
    const T best = window_max<T>(
        ps, op, oq, [&](int ih, int iw) { return sm.conv[m][(ih - ch0) * fw + (iw - cw0)]; }, index);
    y[((n * s.K + k0 + m) * ps.P + op) * ps.Q + oq] = best;
  }
}

Pool2dDesc pool_over(const Conv2dDesc& conv, const Pool2dDesc& pool) {
  Pool2dDesc p = pool;
  p.dtype = conv.dtype;
  p.N = conv.N, p.C = conv.K, p.H = conv.P(), p.W = conv.Q();
  return p;
}

// Blocks of this kernel an SM keeps in flight, for the tile choice: three
// fit by registers (63-72 per thread x 256 threads).
constexpr int64_t kBlocksPerSm = 3;

// The pooled tile with the least predicted time: waves of resident blocks
// times the BN-pixel chunks each block computes (its footprint, halo
// included). Large tiles recompute less halo but give fewer blocks, which
// leaves SMs idle on small problems (one image of a ResNet layer). Ties go to
// fewer blocks (less padding in partial tiles), then more pooled outputs per
// block, then wider tiles (coalesced stores).
ConvPoolTile choose_tile(const Conv2dDesc& conv, const Pool2dDesc& p, int footprint, int sm_count) {
  const int64_t resident_blocks = kBlocksPerSm * sm_count;
  // Footprint extent of `t` pooled outputs along one axis, clipped to the
  // convolution output: an upper bound wherever the tile lies.
  auto span = [](int64_t t, int64_t stride, int64_t k, int64_t dil, int64_t size) {
    return std::min((t - 1) * stride + (k - 1) * dil + 1, size);
  };
  const int64_t blocks_per_tile = conv.N * conv.groups * ceil_div(conv.Kg(), Gemm::BM);
  ConvPoolTile best;
  int64_t best_cost = 0, best_blocks = 0;
  const int64_t max_cols = std::min<int64_t>(p.Q(), 64), max_rows = std::min<int64_t>(p.P(), 64);
  for (int64_t c = 1; c <= max_cols; ++c) {
    const int64_t fw = span(c, p.stride_w, p.kw, p.dil_w, p.W);
    if (fw > footprint) break;
    for (int64_t r = 1; r <= max_rows; ++r) {
      const int64_t pixels = span(r, p.stride_h, p.kh, p.dil_h, p.H) * fw;
      if (pixels > footprint) break;
      const int64_t blocks = ceil_div(p.P(), r) * ceil_div(p.Q(), c) * blocks_per_tile;
      const int64_t cost = ceil_div(blocks, resident_blocks) * ceil_div(pixels, Gemm::BN);
      const bool better = best.rows == 0 || cost < best_cost ||
                          (cost == best_cost && (blocks < best_blocks ||
                                                 (blocks == best_blocks && r * c >= int64_t{best.rows} * best.cols)));
      if (better) {
        best = {static_cast<int>(r), static_cast<int>(c)};
        best_cost = cost, best_blocks = blocks;
      }
    }
  }
  return best;
}

template <class T>
void run_conv_pool(const Conv2dDesc& conv, const Pool2dDesc& pool, const T* x, const T* w, const T* bias, T* y,
                   Stream stream, const ConvPoolTile* planned) {
  check_conv2d(conv);
  const Pool2dDesc p = pool_over(conv, pool);
  check_pool(p);
  const ConvPoolTile tile = planned ? *planned : choose_tile(conv, p, kFootprint<T>, kDefaultSmCount);
  if (planned && tile.rows != 0) {
    // A tile from another descriptor could overflow the block's footprint.
    const int64_t rows = std::min((tile.rows - 1) * p.stride_h + (p.kh - 1) * p.dil_h + 1, p.H);
    const int64_t cols = std::min((tile.cols - 1) * p.stride_w + (p.kw - 1) * p.dil_w + 1, p.W);
    require(tile.rows > 0 && tile.cols > 0 && rows * cols <= kFootprint<T>, "tile: does not fit the fused kernel");
  }
  if (tile.rows == 0) {
    Workspace<T> full(static_cast<size_t>(conv.N * conv.K * conv.P() * conv.Q()), stream);
    conv2d(conv, x, w, bias, full.get(), stream);
    max_pool2d(p, full.get(), y, nullptr, stream);
    return;
  }
  require(conv.groups <= kGridYZMax && ceil_div(conv.Kg(), Gemm::BM) <= kGridYZMax,
          "groups: too many groups or filters per group for the GPU grid");
  const int64_t PQ = p.P() * p.Q();
  const int64_t tiles_per_row = ceil_div(p.Q(), tile.cols);
  const int64_t tiles = ceil_div(p.P(), tile.rows) * tiles_per_row;
  require(tiles <= kInt32Max, "input: too many pooled tiles for the GPU grid");
  const ConvPoolGrid tg{tile.rows, tile.cols, static_cast<int>(tiles_per_row)};
  const PoolShape ps = pool_shape(p);
  const int64_t step = std::min(images_per_launch(conv, conv.K * PQ), kGridYZMax / conv.groups);
  for (int64_t n0 = 0; n0 < conv.N; n0 += step) {
    const int64_t images = std::min(step, conv.N - n0);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(conv.Kg(), Gemm::BM)),
                    static_cast<unsigned>(images * conv.groups));
    launch(&conv_pool_kernel<T>, grid, dim3(Gemm::kThreads), 0, stream, conv_shape(conv, images), ps, tg,
           x + n0 * conv.C * conv.H * conv.W, w, bias, y + n0 * conv.K * PQ);
  }
}

}  // namespace

ConvPoolTile conv_pool_tile(const Conv2dDesc& conv, const Pool2dDesc& pool, bool f64, int sm_count) {
  check_conv2d(conv);
  const Pool2dDesc p = pool_over(conv, pool);
  check_pool(p);
  require(sm_count > 0, "sm_count: must be positive");
  return choose_tile(conv, p, f64 ? kFootprint<double> : kFootprint<float>, sm_count);
}

void conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool, const float* x, const float* w,
                       const float* bias, float* y, Stream stream, const ConvPoolTile* tile) {
  run_conv_pool(conv, pool, x, w, bias, y, stream, tile);
}

void conv2d_max_pool2d(const Conv2dDesc& conv, const Pool2dDesc& pool, const double* x, const double* w,
                       const double* bias, double* y, Stream stream, const ConvPoolTile* tile) {
  run_conv_pool(conv, pool, x, w, bias, y, stream, tile);
}

}  // namespace lk::cuda
