// Which instruction sets the running CPU offers, and the level kernels use.
// The level is the best one detected, capped by LEPTON_ISA or set_isa_cap(),
// so every level can be exercised on one machine.
#pragma once
#include <string>

namespace lk {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // throws std::invalid_argument

Isa detected_isa();  // best level the CPU and OS support
Isa active_isa();    // detected, capped
void set_isa_cap(Isa cap);

// Identifies the processor model (vendor, family, model, stepping, brand),
// for caches of measurements that must not move to another machine.
std::string cpu_signature();

}  // namespace lk
