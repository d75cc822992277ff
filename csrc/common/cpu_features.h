// Run-time CPU feature detection for the C++ CPU kernels. We never compile with -march=native: each kernel has
// an AVX-512 and an AVX2 version compiled with __attribute__((target(...))) and a scalar one, and picks at run
// time, so one wheel runs on any x86-64 machine. NVLM_KERNELS_CPU_ISA=avx2|scalar caps the level (tests use it
// to exercise the fallbacks on an AVX-512 machine).
#pragma once

#include <cstdlib>
#include <cstring>

namespace nvlm {

enum class CpuCapability { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuCapability detect_cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  CpuCapability best = CpuCapability::kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = CpuCapability::kAvx2;
  if (best == CpuCapability::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = CpuCapability::kAvx512;
#else
  CpuCapability best = CpuCapability::kScalar;
#endif
  if (const char* cap = std::getenv("NVLM_KERNELS_CPU_ISA")) {
    CpuCapability asked = best;
    if (std::strcmp(cap, "scalar") == 0) asked = CpuCapability::kScalar;
    else if (std::strcmp(cap, "avx2") == 0) asked = CpuCapability::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) asked = CpuCapability::kAvx512;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
}

// Read on every call (cheap) so tests can change NVLM_KERNELS_CPU_ISA between calls.
inline CpuCapability cpu_capability() { return detect_cpu_capability(); }

inline const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512: return "avx512";
    case CpuCapability::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace nvlm
