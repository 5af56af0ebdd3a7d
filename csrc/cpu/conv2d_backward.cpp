// Convolution backward as GEMMs over blocks of output pixels:
//   grad_weight_g += grad_out_g (Kg x L) * col^T (L x CgRS), col being the
//                    im2col of the input for those L pixels;
//   grad_col       = W_g^T (CgRS x Kg) * grad_out_g (Kg x L), scattered
//                    back onto the input's pixels (col2im).
// The pixel blocks keep col and grad_col in L2. Images are split among the
// threads, each adding into its own partial grad_weight, summed at the end;
// a gradient scattered from a max-pool is built one image at a time in
// cache, never as a full-size array.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"
#include "cpu/backward.h"
#include "cpu/gemm_strided.h"
#include "cpu/ukernels/train_ukernels.h"

namespace lk::cpu {

namespace {

// Walks output pixels [j0, j1) of one kernel tap (r, s) in row segments:
// fn(t, ih, iw0, seg) for the segment's first pixel j0 + t, its input row ih
// (may lie outside the input) and first column iw0, seg pixels long.
template <class F>
void tap_segments(const Conv2dDesc& d, int64_t r, int64_t s, int64_t j0, int64_t j1, F&& fn) {
  const int64_t Q = d.Q();
  int64_t oh = j0 / Q, ow = j0 % Q;
  for (int64_t p = j0; p < j1;) {
    const int64_t seg = std::min(Q - ow, j1 - p);
    fn(p - j0, oh * d.stride_h - d.pad_top + r * d.dil_h, ow * d.stride_w - d.pad_left + s * d.dil_w, seg);
    p += seg;
    ow = 0;
    ++oh;
  }
}

// col[(c, r, s)][0:L] = x[c][ih][iw] for pixels [j0, j1) of channels [c0, c1), 0 in the padding.
template <class T>
void im2col_block(const Conv2dDesc& d, const T* xc, int64_t c0, int64_t c1, int64_t j0, int64_t j1, T* col,
                  int64_t ldc) {
  const int64_t H = d.H, W = d.W, sw = d.stride_w;
  T* dst = col;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = 0; r < d.R; ++r)
      for (int64_t s = 0; s < d.S; ++s, dst += ldc)
        tap_segments(d, r, s, j0, j1, [&](int64_t t, int64_t ih, int64_t iw0, int64_t seg) {
          T* o = dst + t;
          if (ih < 0 || ih >= H) {
            std::fill(o, o + seg, T(0));
            return;
          }
          const T* row = xc + (c * H + ih) * W;
          if (sw == 1 && iw0 >= 0 && iw0 + seg <= W) {
            std::memcpy(o, row + iw0, static_cast<size_t>(seg) * sizeof(T));
            return;
          }
          for (int64_t q = 0; q < seg; ++q) {
            const int64_t iw = iw0 + q * sw;
            o[q] = iw >= 0 && iw < W ? row[iw] : T(0);
          }
        });
}

// The inverse scatter: gx[c][ih][iw] += col[(c, r, s)][p] over the same pixels.
template <class T>
void col2im_block(const Conv2dDesc& d, const T* col, int64_t ldc, int64_t c0, int64_t c1, int64_t j0, int64_t j1,
                  T* gxc) {
  const int64_t H = d.H, W = d.W, sw = d.stride_w;
  const T* src = col;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = 0; r < d.R; ++r)
      for (int64_t s = 0; s < d.S; ++s, src += ldc)
        tap_segments(d, r, s, j0, j1, [&](int64_t t, int64_t ih, int64_t iw0, int64_t seg) {
          if (ih < 0 || ih >= H) return;
          const T* o = src + t;
          T* row = gxc + (c * H + ih) * W;
          if (sw == 1 && iw0 >= 0 && iw0 + seg <= W) {
            T* g = row + iw0;
            for (int64_t q = 0; q < seg; ++q) g[q] += o[q];
            return;
          }
          for (int64_t q = 0; q < seg; ++q) {
            const int64_t iw = iw0 + q * sw;
            if (iw >= 0 && iw < W) row[iw] += o[q];
          }
        });
}

template <class T>
class ConvBackward {
 public:
  ConvBackward(const Conv2dDesc& d, const ConvGradSource<T>& src, const T* x, const T* w)
      : d_(d), src_(src), x_(x), w_(w) {
    G_ = d.groups, Kg_ = d.Kg(), Cg_ = d.Cg(), RS_ = d.R * d.S, CgRS_ = Cg_ * RS_, PQ_ = d.P() * d.Q();
    // Pixels per block: the im2col block (CgRS x L) within 256 KB of L2.
    L_ = std::clamp<int64_t>(65536 / std::max<int64_t>(CgRS_, 1), 64, std::max<int64_t>(PQ_, 1));
    // grad_weight as Kg x CgRS (A: grad_out in place) or its transpose (A:
    // col in place), whichever leaves the microkernel fewer padded lanes.
    transposed_ = gemm_padded_area<T>(CgRS_, Kg_) < gemm_padded_area<T>(Kg_, CgRS_);
    uk_ = &gemm_shape_for<T>(CgRS_, Kg_);
  }

  // Image n's pooled gradient (K x M), masked by the activation: in place,
  // or through ReLU's backward (the vectorised kernel) into kInputBandSlot.
  const T* masked_pooled(int64_t n) const {
    const int64_t K = d_.K, M = src_.pooled_plane;
    const T* g = src_.pooled_grad + n * K * M;
    if (!src_.relu) return g;
    const T* out = src_.pooled_out + n * K * M;
    T* mg = scratch_array<T>(kInputBandSlot, static_cast<size_t>(K * M));
    train_ukernels().relu_backward<T>()(K * M, g, out, mg);
    return mg;
  }

  // dL/d(conv output) of image n (K x PQ): in place, or scattered into buf.
  const T* grad_image(int64_t n, T* buf) const {
    const int64_t K = d_.K, PQ = PQ_;
    if (src_.grad) return src_.grad + n * K * PQ;
    std::fill(buf, buf + K * PQ, T(0));
    const int64_t M = src_.pooled_plane;
    const T* mg = masked_pooled(n);
    const int64_t* idx = src_.indices + n * K * M;
    for (int64_t k = 0; k < K; ++k) {
      T* b = buf + k * PQ;
      for (int64_t e = k * M; e < (k + 1) * M; ++e) {
        const int64_t i = idx[e];
        check_index(i);
        b[i] += mg[e];
      }
    }
    return buf;
  }

  // Sums of `rows` rows of `len` entries, added into gb: eight running
  // sums per row, independent chains of double additions.
  static void add_row_sums(const T* a, int64_t rows, int64_t len, double* gb) {
    for (int64_t k = 0; k < rows; ++k) {
      double acc[8] = {};
      const T* g = a + k * len;
      int64_t p = 0;
      for (; p + 8 <= len; p += 8)
        for (int u = 0; u < 8; ++u) acc[u] += g[p + u];
      for (; p < len; ++p) acc[0] += g[p];
      gb[k] += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }

  // Group g's output gradient of image n transposed into the microkernel's
  // B panels (pixels x Kg channels, NR channels per panel, PQ * NR apart):
  // from gy (K x PQ), or scattered straight from the masked pooled gradient.
  T* grad_panels(int64_t n, int64_t g, const T* gy, const T* pooled) const {
    const int nr = uk_->nr;
    const int64_t panels = ceil_div(Kg_, nr), stride = PQ_ * nr;
    // kPoolBandSlot: no pooling runs inside a backward task.
    T* b = scratch_array<T>(kPoolBandSlot, static_cast<size_t>(panels * stride));
    if (gy != nullptr) {
      constexpr int64_t kRows = 16;  // pixels per pass: the panel rows written stay in a few cache lines
      for (int64_t pb = 0; pb < panels; ++pb) {
        T* dst = b + pb * stride;
        for (int64_t p0 = 0; p0 < PQ_; p0 += kRows) {
          const int64_t p1 = std::min(PQ_, p0 + kRows);
          for (int64_t j = 0; j < nr; ++j) {
            const int64_t k = pb * nr + j;
            if (k < Kg_) {
              const T* src = gy + (g * Kg_ + k) * PQ_;
              for (int64_t p = p0; p < p1; ++p) dst[p * nr + j] = src[p];
            } else {
              for (int64_t p = p0; p < p1; ++p) dst[p * nr + j] = T(0);
            }
          }
        }
      }
      return b;
    }
    std::fill(b, b + panels * stride, T(0));
    // Pooled element e of every channel lands in the same window of the
    // plane: a few pooled elements at a time for all channels keep the panel
    // rows they touch in L1 (the whole panel spans L2).
    const int64_t M = src_.pooled_plane, K = d_.K;
    const T* mg = pooled + g * Kg_ * M;
    const int64_t* idx = src_.indices + (n * K + g * Kg_) * M;
    constexpr int64_t kBlock = 16;
    for (int64_t e0 = 0; e0 < M; e0 += kBlock) {
      const int64_t e1 = std::min(M, e0 + kBlock);
      for (int64_t kk = 0; kk < Kg_; ++kk) {
        T* dst = b + (kk / nr) * stride + kk % nr;
        const int64_t* ik = idx + kk * M;
        const T* gk = mg + kk * M;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t i = ik[e];
          check_index(i);
          dst[i * nr] += gk[e];
        }
      }
    }
    return b;
  }

  void check_index(int64_t i) const {
    if (i < 0 || i >= PQ_)
      throw std::invalid_argument(
          cat("indices: ", i, " is out of range for a convolution output plane of ", PQ_, " elements"));
  }

  // Image n's contribution to the partial sums gw (layout per transposed_)
  // and gb. gy: its output gradient (K x PQ), or null to read the pooled
  // source directly (transposed_ only).
  void weight_grad_image(int64_t n, const T* xn, const T* gy, T* gw, double* gb) const {
    const T* pooled = gy ? nullptr : masked_pooled(n);
    if (gb) {
      if (gy)
        add_row_sums(gy, d_.K, PQ_, gb);
      else
        add_row_sums(pooled, d_.K, src_.pooled_plane, gb);
    }
    if (!gw) return;
    T* col = scratch_array<T>(kImageSlot, static_cast<size_t>(CgRS_ * L_));
    for (int64_t g = 0; g < G_; ++g) {
      const T* xg = xn + g * Cg_ * d_.H * d_.W;
      T* gwg = gw + g * Kg_ * CgRS_;
      const T* bp = transposed_ ? grad_panels(n, g, gy, pooled) : nullptr;
      const T* gyg = gy ? gy + g * Kg_ * PQ_ : nullptr;
      for (int64_t j0 = 0; j0 < PQ_; j0 += L_) {
        const int64_t L = std::min(L_, PQ_ - j0);
        im2col_block(d_, xg, 0, Cg_, j0, j0 + L, col, L);
        if (transposed_) {  // (CgRS x L) * (L x Kg): col's rows in place, the gradient's panels
          GemmEpilogue<T> ep;
          ep.accumulate = true;
          macro_kernel(*uk_, CgRS_, Kg_, L, col, int64_t{0}, L, bp + j0 * uk_->nr, PQ_ * uk_->nr, gwg, Kg_, ep);
        } else {  // (Kg x L) * (L x CgRS)
          gemm_strided<T>(Kg_, CgRS_, L, gyg + j0, PQ_, 1, col, 1, L, gwg, CgRS_, true, 1);
        }
      }
    }
  }

  // grad_input of image n, channels [c0, c1) of group g (gxn: the image's gradient).
  void input_grad(const T* gy, int64_t g, int64_t c0, int64_t c1, T* gxn) const {
    const int64_t HW = d_.H * d_.W;
    T* gxc = gxn + g * Cg_ * HW;
    std::fill(gxc + c0 * HW, gxc + c1 * HW, T(0));
    const int64_t rows = (c1 - c0) * RS_;
    const int64_t L = std::clamp<int64_t>(65536 / std::max<int64_t>(rows, 1), 64, std::max<int64_t>(PQ_, 1));
    T* dcol = scratch_array<T>(kInputBandSlot, static_cast<size_t>(rows * L));
    const T* wg = w_ + g * Kg_ * CgRS_ + c0 * RS_;  // W_g^T rows (c, r, s): A(i, k) = wg[k * CgRS + i]
    const T* gyg = gy + g * Kg_ * PQ_;
    for (int64_t j0 = 0; j0 < PQ_; j0 += L) {
      const int64_t l = std::min(L, PQ_ - j0);
      gemm_strided<T>(rows, l, Kg_, wg, 1, CgRS_, gyg + j0, PQ_, 1, dcol, l, false, 1);
      col2im_block(d_, dcol, l, c0, c1, j0, j0 + l, gxc);
    }
  }

  void run(T* gx, T* gw, T* gb) const {
    const int64_t N = d_.N, K = d_.K, HW = d_.H * d_.W, CHW = d_.C * HW;
    const int64_t wsize = K * CgRS_;
    if (N == 0 || PQ_ == 0) {
      if (gx) std::fill(gx, gx + N * CHW, T(0));
      if (gw) std::fill(gw, gw + wsize, T(0));
      if (gb) std::fill(gb, gb + K, T(0));
      return;
    }
    const double gemm_flops = 2.0 * N * K * CgRS_ * PQ_;
    const int threads = threads_for_flops(gemm_flops * ((gx != nullptr) + (gw != nullptr) + 0.1));
    // Images split among `chunks` tasks, each with its own partial sums.
    // grad_input goes image by image with them unless there are fewer
    // images than threads; then it gets a pass of its own over channel blocks.
    const int64_t chunks = std::min<int64_t>(N, threads);
    const bool gx_per_image = gx && chunks >= threads;
    const bool want_wb = gw || gb;
    std::vector<T> part_w(gw ? static_cast<size_t>(chunks * wsize) : 0, T(0));
    std::vector<double> part_b(gb ? static_cast<size_t>(chunks * K) : 0, 0.0);
    const bool scatter = src_.grad == nullptr;

    if (want_wb || gx_per_image)
      parallel_for(chunks, threads, [&](int64_t chunk) {
        const int64_t n0 = N * chunk / chunks, n1 = N * (chunk + 1) / chunks;
        T* buf = scatter ? scratch_array<T>(kFusedBandSlot, static_cast<size_t>(K * PQ_)) : nullptr;
        for (int64_t n = n0; n < n1; ++n) {
          // A pooled gradient goes straight into the GEMM's panels when
          // nothing else needs it at full size.
          const bool direct = scatter && transposed_ && !gx_per_image;
          const T* gy = direct ? nullptr : grad_image(n, buf);
          if (want_wb)
            weight_grad_image(n, x_ + n * CHW, gy, gw ? part_w.data() + chunk * wsize : nullptr,
                              gb ? part_b.data() + chunk * K : nullptr);
          if (gx_per_image)
            for (int64_t g = 0; g < G_; ++g) input_grad(gy, g, 0, Cg_, gx + n * CHW);
        }
      });

    if (gx && !gx_per_image) {
      // Channel blocks: enough tasks for the threads, each block's rows a
      // whole number of channels so tasks write disjoint planes.
      const int64_t per_image = N * G_;
      const int64_t cblocks = std::min(Cg_, ceil_div(2 * threads, per_image));
      const int64_t cb = ceil_div(Cg_, cblocks);
      const int64_t nb = ceil_div(Cg_, cb);
      parallel_for(per_image * nb, threads, [&](int64_t task) {
        const int64_t n = task / (G_ * nb), g = (task / nb) % G_, c0 = (task % nb) * cb;
        T* buf = scatter ? scratch_array<T>(kFusedBandSlot, static_cast<size_t>(K * PQ_)) : nullptr;
        input_grad(grad_image(n, buf), g, c0, std::min(Cg_, c0 + cb), gx + n * CHW);
      });
    }

    if (gb)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += part_b[c * K + k];
        gb[k] = static_cast<T>(s);
      }
    if (gw) {
      for (int64_t c = 1; c < chunks; ++c)
        for (int64_t i = 0; i < wsize; ++i) part_w[i] += part_w[c * wsize + i];
      if (!transposed_) {
        std::copy(part_w.begin(), part_w.begin() + wsize, gw);
      } else {
        for (int64_t g = 0; g < G_; ++g)
          for (int64_t j = 0; j < CgRS_; ++j)
            for (int64_t k = 0; k < Kg_; ++k)
              gw[(g * Kg_ + k) * CgRS_ + j] = part_w[g * Kg_ * CgRS_ + j * Kg_ + k];
      }
    }
  }

 private:
  const Conv2dDesc& d_;
  const ConvGradSource<T>& src_;
  const T* x_;
  const T* w_;
  int64_t G_, Kg_, Cg_, RS_, CgRS_, PQ_, L_;
  bool transposed_;
  const GemmUkernel<T>* uk_;  // the transposed grad_weight GEMM's
};

}  // namespace

template <class T>
void conv2d_backward(const Conv2dDesc& d, const ConvGradSource<T>& src, const T* x, const T* w, T* grad_input,
                     T* grad_weight, T* grad_bias) {
  ConvBackward<T>(d, src, x, w).run(grad_input, grad_weight, grad_bias);
}

template void conv2d_backward<float>(const Conv2dDesc&, const ConvGradSource<float>&, const float*, const float*,
                                     float*, float*, float*);
template void conv2d_backward<double>(const Conv2dDesc&, const ConvGradSource<double>&, const double*,
                                      const double*, double*, double*, double*);

}  // namespace lk::cpu
