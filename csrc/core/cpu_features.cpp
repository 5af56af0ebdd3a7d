#include "core/cpu_features.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

#include "core/error.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LK_X86 1
#endif

namespace lk {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "generic") return Isa::generic;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument(cat("isa: expected 'generic', 'avx2' or 'avx512', got '", name, "'"));
}

#ifdef LK_X86
static unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

static Isa detect() {
#ifdef LK_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::generic;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  if (!osxsave || !avx) return Isa::generic;
  const unsigned long long xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Isa::generic;  // OS saves XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::generic;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM
  if (avx2 && fma && avx512f && avx512dq && avx512bw && avx512vl && zmm_state) return Isa::avx512;
  if (avx2 && fma) return Isa::avx2;
#endif
  return Isa::generic;
}

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

static Isa initial_cap() {
  const char* env = std::getenv("LEPTON_ISA");
  if (env == nullptr || *env == '\0') return Isa::avx512;
  try {
    return isa_from_name(env);
  } catch (const std::invalid_argument&) {
    return Isa::generic;  // an unknown request is honoured conservatively
  }
}

static std::atomic<int> g_cap{-1};

Isa active_isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  if (cap < 0) {
    cap = static_cast<int>(initial_cap());
    g_cap.store(cap, std::memory_order_relaxed);
  }
  const Isa det = detected_isa();
  return static_cast<int>(det) < cap ? det : static_cast<Isa>(cap);
}

std::string cpu_signature() {
  std::string sig;
#ifdef LK_X86
  unsigned regs[12] = {};
  __get_cpuid(0, &regs[0], &regs[1], &regs[3], &regs[2]);  // vendor in ebx, edx, ecx order
  sig.append(reinterpret_cast<const char*>(&regs[1]), 12);
  unsigned a = 0, b = 0, c = 0, d = 0;
  __get_cpuid(1, &a, &b, &c, &d);
  sig += cat("-", std::hex, a, "-");
  for (unsigned leaf = 0x80000002; leaf <= 0x80000004; ++leaf) {
    if (!__get_cpuid(leaf, &regs[0], &regs[1], &regs[2], &regs[3])) break;
    sig.append(reinterpret_cast<const char*>(regs), 16);
  }
#else
  sig = "generic-cpu";
#endif
  std::string clean;
  for (char ch : sig)
    if (std::isalnum(static_cast<unsigned char>(ch))) clean += ch;
  return clean;
}

void set_isa_cap(Isa cap) { g_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

}  // namespace lk
