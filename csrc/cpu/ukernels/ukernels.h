// The microkernel table: one per instruction-set level, each filled in a
// translation unit compiled with that level's flags. Everything above the
// microkernels (packing, blocking, threading) is ISA-independent and asks the
// table of the active level for its kernels and their tile sizes.
#pragma once
#include <cstdint>

#include "core/cpu_features.h"

namespace lk::cpu {

// What a GEMM microkernel does around its MR x NR tile of C = A * B.
template <class T>
struct GemmEpilogue {
  const T* bias = nullptr;    // first entry for this tile, or none
  bool bias_per_row = true;   // per row of C (conv channels) or per column (linear)
  bool accumulate = false;    // add to C instead of overwriting it (later K blocks)
  bool relu = false;          // applied after the last K block
};

// C[0:mr, 0:nr] (row stride ldc) = A * B with the epilogue, over kc steps.
// B: kc x NR, packed k-major. A: kc x MR packed k-major (`packed`, lda
// ignored), or rows of a row-major matrix with row stride lda (`rows`).
// mr <= MR and nr <= NR; only the valid mr x nr part of C is read or written
// and only mr rows of a row-major A are read. A per-column bias must be
// readable for a whole NR; a per-row bias is read for the mr valid rows only.
template <class T>
using GemmUkernelFn = void (*)(int64_t kc, const T* A, int64_t lda, const T* B, T* C, int64_t ldc, int mr, int nr,
                               const GemmEpilogue<T>& ep);

template <class T>
struct GemmUkernel {
  int mr;
  int nr;
  GemmUkernelFn<T> packed;
  GemmUkernelFn<T> rows;
  const char* name;
};

// y[0:n] = act(bias + W x) for one row x of length k and n rows of W (row
// stride ldw), both contiguous along k; bias may be null.
template <class T>
using DotUkernelFn = void (*)(int64_t k, const T* x, const T* w, int64_t ldw, int64_t n, T* y, const T* bias,
                              bool relu);

template <class T>
struct DotUkernel {
  DotUkernelFn<T> fn;
  const char* name;
};

struct UkernelTable {
  Isa isa;
  GemmUkernel<float> f32_gemm;
  GemmUkernel<double> f64_gemm;
  DotUkernel<float> f32_dot;
  DotUkernel<double> f64_dot;

  template <class T> const GemmUkernel<T>& gemm() const;
  template <class T> const DotUkernel<T>& dot() const;
};

template <> inline const GemmUkernel<float>& UkernelTable::gemm<float>() const { return f32_gemm; }
template <> inline const GemmUkernel<double>& UkernelTable::gemm<double>() const { return f64_gemm; }
template <> inline const DotUkernel<float>& UkernelTable::dot<float>() const { return f32_dot; }
template <> inline const DotUkernel<double>& UkernelTable::dot<double>() const { return f64_dot; }

// The table of the active level (see active_isa()).
const UkernelTable& ukernels();
const UkernelTable& ukernels(Isa isa);

}  // namespace lk::cpu
