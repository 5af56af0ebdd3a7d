// The machine as the cost model sees it: ceilings measured once per process
// (per ISA level) on first use, in a few milliseconds.
#pragma once
#include <string>

#include "core/cpu_features.h"
#include "core/tensor.h"
#include "cpu/ukernels/ukernels.h"

namespace lk::cpu {

struct MachineModel {
  Isa isa;
  double gemm_flops[2][kGemmShapes];  // one thread, each GEMM microkernel on cached data: [f32, f64][shape]
  double bandwidth;      // main memory, bytes moved per second (read + write) by one thread
  double wake_s;         // handing a job to the pool's workers and waiting for it
  bool wake_measured;    // false while the pool has had one thread (wake_s = 0 then)
  std::string describe() const;
};

const MachineModel& machine_model();  // for the active ISA level

// Float32 FLOP/s of independent multiply-adds in registers on `threads`
// threads at the active ISA level: the FMA ceiling (measured, tens of ms).
double fma_peak_flops(int threads);

}  // namespace lk::cpu
