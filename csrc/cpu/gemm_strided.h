// A general GEMM over operands given by strides, for the backward passes:
// their products (gradients of weights and inputs) read transposed views of
// the forward operands, so neither side has a fixed layout. Built on the same
// packing, macro-kernel and microkernels as the forward ops (gemm.h).
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/memory.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"

namespace lk::cpu {

// The level's microkernel shape that pads an m x n product least.
template <class T>
const GemmUkernel<T>& gemm_shape_for(int64_t m, int64_t n) {
  const UkernelTable& t = ukernels();
  const GemmUkernel<T>* best = &t.gemm<T>(0);
  for (int shape = 1; shape < kGemmShapes; ++shape) {
    const GemmUkernel<T>& u = t.gemm<T>(shape);
    if (round_up(m, u.mr) * round_up(n, u.nr) < round_up(m, best->mr) * round_up(n, best->nr)) best = &u;
  }
  return *best;
}

// Padded area (microkernel work) of an m x n product with the best shape.
template <class T>
int64_t gemm_padded_area(int64_t m, int64_t n) {
  const GemmUkernel<T>& uk = gemm_shape_for<T>(m, n);
  return round_up(m, uk.mr) * round_up(n, uk.nr);
}

// Threads worth waking for `flops` of work: a hand-over costs a few
// microseconds, which a thread must win back.
inline int threads_for_flops(double flops) {
  const double t = flops / 4e5;
  return t < 1 ? 1 : t > get_num_threads() ? get_num_threads() : static_cast<int>(t);
}

// C[0:m, 0:n] (row stride ldc) = A * B, or += when accumulate, with
// A(i, p) = A[i * ars + p * acs] (m x k) and B(p, j) = B[p * brs + j * bcs]
// (k x n). A whose rows are contiguous is read in place; otherwise it is
// packed per tile, as B always is. Tiles of C run on up to `threads`
// threads (serially when called from inside a task). Uses the kPackSlot and
// kTileSlot scratch buffers of the threads it runs on.
template <class T>
void gemm_strided(int64_t m, int64_t n, int64_t k, const T* A, int64_t ars, int64_t acs, const T* B, int64_t brs,
                  int64_t bcs, T* C, int64_t ldc, bool accumulate, int threads) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, T(0));
    return;
  }
  const GemmUkernel<T>& uk = gemm_shape_for<T>(m, n);
  const int mr = uk.mr, nr = uk.nr;
  const bool a_rows = acs == 1 && ars > 0;  // the microkernel's `rows` mode; lda 0 means packed
  const int64_t kc_max = ceil_div(k, ceil_div(k, 512));
  // B blocks of kc x nc stay within L2; A blocks of mc rows are packed once per K block.
  const int64_t np = round_up(n, nr);
  int64_t nc = std::clamp<int64_t>((256 * 1024 / (kc_max * static_cast<int64_t>(sizeof(T)))) / nr * nr, nr, np);
  const int64_t mc = std::min(round_up(m, mr), int64_t{16} * mr);
  const int64_t mblocks = ceil_div(m, mc);
  const int64_t want = 2 * static_cast<int64_t>(std::max(threads, 1));
  if (threads > 1 && mblocks * ceil_div(np, nc) < want)
    nc = std::max<int64_t>(nr, round_up(ceil_div(np, ceil_div(want, mblocks)), nr));
  const int64_t nblocks = ceil_div(n, nc);
  parallel_for(mblocks * nblocks, threads, [&](int64_t task) {
    const int64_t i0 = (task % mblocks) * mc, mm = std::min(mc, m - i0);
    const int64_t j0 = (task / mblocks) * nc, nn = std::min(nc, n - j0);
    T* bp = scratch_array<T>(kPackSlot, static_cast<size_t>(kc_max * round_up(nn, nr)));
    T* ap = a_rows ? nullptr : scratch_array<T>(kTileSlot, static_cast<size_t>(kc_max * round_up(mm, mr)));
    for (int64_t pc = 0; pc < k; pc += kc_max) {
      const int64_t kc = std::min(kc_max, k - pc);
      pack_b_panels(B + pc * brs + j0 * bcs, brs, bcs, kc, nn, nr, bp);
      const T* a = A + i0 * ars + pc * acs;
      if (!a_rows) {
        pack_a_panels(a, ars, acs, mm, kc, mr, ap);
        a = ap;
      }
      GemmEpilogue<T> ep;
      ep.accumulate = accumulate || pc > 0;
      macro_kernel(uk, mm, nn, kc, a, kc * mr, a_rows ? ars : 0, bp, kc * nr, C + i0 * ldc + j0, ldc, ep);
    }
  });
}

}  // namespace lk::cpu
