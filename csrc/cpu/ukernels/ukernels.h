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

// C[0:mr, 0:nr] (row stride ldc) = A (kc x MR, packed k-major) * B (kc x NR,
// packed k-major), with the epilogue. mr <= MR and nr <= NR; only the valid
// mr x nr part of C is read or written. A per-column bias must be readable
// for a whole NR; a per-row bias is read for the mr valid rows only.
template <class T>
using GemmUkernelFn = void (*)(int64_t kc, const T* A, const T* B, T* C, int64_t ldc, int mr, int nr,
                               const GemmEpilogue<T>& ep);

template <class T>
struct GemmUkernel {
  int mr;
  int nr;
  GemmUkernelFn<T> fn;
  const char* name;
};

struct UkernelTable {
  Isa isa;
  GemmUkernel<float> f32_gemm;
  GemmUkernel<double> f64_gemm;

  template <class T> const GemmUkernel<T>& gemm() const;
};

template <> inline const GemmUkernel<float>& UkernelTable::gemm<float>() const { return f32_gemm; }
template <> inline const GemmUkernel<double>& UkernelTable::gemm<double>() const { return f64_gemm; }

// The table of the active level (see active_isa()).
const UkernelTable& ukernels();
const UkernelTable& ukernels(Isa isa);

}  // namespace lk::cpu
