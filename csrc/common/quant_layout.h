// The weight-only quantised format (nvlm_kernels/packing.py is the definition; design.md §3), as host+device
// inline functions shared by the CPU kernels (csrc/cpu/quant_*.cpp) and the CUDA kernels (csrc/cuda/quant_gemv.cu):
//
//   int8 : qweight int8 [N, K], scale [N];               w[n,k] = q[n,k] * scale[n]
//   int4 : qweight uint8 [N, K/2] (low nibble = even k), scales [N, K/g], zeros uint8 [N, K/g] (0..15);
//          w[n,k] = (q[n,k] - zeros[n, k/g]) * scales[n, k/g]
//
// The SIMD kernels decode many weights at once with their own shuffles, but their scalar tails, the scalar
// fallback, the dequantise-to-tile path and the CUDA kernel all go through these functions, and the tests compare
// every path against packing.py.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NVLM_HOST_DEVICE __host__ __device__
#else
#define NVLM_HOST_DEVICE
#endif

namespace nvlm {
namespace quant {

// Group sizes the int4 format allows (packing.INT4_GROUP_SIZES).
NVLM_HOST_DEVICE inline bool valid_group_size(int64_t g) { return g == 32 || g == 64 || g == 128; }

// ---- int4 nibbles -----------------------------------------------------------------------------------------------
// Byte j of a packed row holds k = 2j (low nibble) and k = 2j + 1 (high nibble).
NVLM_HOST_DEVICE inline int int4_lo(uint8_t byte) { return byte & 0x0F; }
NVLM_HOST_DEVICE inline int int4_hi(uint8_t byte) { return byte >> 4; }

// q[n, k] from a packed row (row = qweight + n * K/2).
NVLM_HOST_DEVICE inline int int4_at(const uint8_t* row, int64_t k) {
  const uint8_t b = row[k >> 1];
  return (k & 1) ? int4_hi(b) : int4_lo(b);
}

// Nibble i (0..7, i = k offset) of a 32-bit word holding 8 consecutive packed weights k0..k0+7 (4 bytes,
// little-endian): byte i/2, low nibble for even i. For the little-endian word this is simply bits 4i..4i+3.
NVLM_HOST_DEVICE inline int int4_from_word(uint32_t word, int i) { return (word >> (4 * i)) & 0x0F; }

// Index of the group holding column k.
NVLM_HOST_DEVICE inline int64_t group_of(int64_t k, int64_t group_size) { return k / group_size; }

// (q - z) as an exact small integer (-15..15); times the scale it is the weight.
NVLM_HOST_DEVICE inline float int4_centered(int q, int zero) { return static_cast<float>(q - zero); }
NVLM_HOST_DEVICE inline float int4_dequant(int q, int zero, float scale) { return int4_centered(q, zero) * scale; }

// Dequantise one group of `group_size` weights starting at column k0 (a multiple of group_size) of one packed row.
// out[i] = w[n, k0 + i]. T is any type constructible from float (float, or a 16-bit type on the host).
template <typename T>
NVLM_HOST_DEVICE inline void int4_dequant_group(const uint8_t* row, int64_t k0, int64_t group_size, float scale,
                                                int zero, T* out) {
  const uint8_t* p = row + (k0 >> 1);
  for (int64_t j = 0; j < group_size / 2; ++j) {
    const uint8_t b = p[j];
    out[2 * j] = T(int4_dequant(int4_lo(b), zero, scale));
    out[2 * j + 1] = T(int4_dequant(int4_hi(b), zero, scale));
  }
}

// Dot product of one int4 group with fp32 activations x[0..group_size), using the zero-point identity
//   sum_k (q_k - z) * s * x_k = s * (sum_k q_k x_k - z * sum_k x_k)
// (the integer part stays exact; the SIMD kernels use the same split).
NVLM_HOST_DEVICE inline float int4_group_dot(const uint8_t* row, int64_t k0, int64_t group_size, float scale,
                                             int zero, const float* x) {
  const uint8_t* p = row + (k0 >> 1);
  float qx = 0.f, sx = 0.f;
  for (int64_t j = 0; j < group_size / 2; ++j) {
    const uint8_t b = p[j];
    qx += static_cast<float>(int4_lo(b)) * x[2 * j] + static_cast<float>(int4_hi(b)) * x[2 * j + 1];
    sx += x[2 * j] + x[2 * j + 1];
  }
  return scale * (qx - static_cast<float>(zero) * sx);
}

// ---- int8 --------------------------------------------------------------------------------------------------------
NVLM_HOST_DEVICE inline float int8_dequant(int8_t q, float scale) { return static_cast<float>(q) * scale; }

// ---- 16-bit float bit patterns (the CPU kernels read bf16/fp16 tensors as uint16) ---------------------------------
NVLM_HOST_DEVICE inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// IEEE fp16 bits -> fp32 (exact, subnormals included).
NVLM_HOST_DEVICE inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
  if (exp == 0x1Fu) {
    u = sign | 0x7f800000u | (man << 13);                     // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);            // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;                                                 // +-0
  } else {                                                    // subnormal: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN kept quiet).
NVLM_HOST_DEVICE inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---- Kernel choice by M (the number of activation rows) -------------------------------------------------------------
// Mirrors nvlm_kernels.quant_linear.select_kernel (THE routing function; a test checks the numbers agree):
// M <= kGemvMaxM* -> "gemv" (weights decoded in registers, streamed once), larger M -> "gemm" (dequantise weight
// tiles, then a dense matmul: oneDNN on CPU, cuBLAS on CUDA). On CPU with AVX512-BF16, kTileMinMCpu <= M <=
// kGemvMaxMCpu -> "tile" (a weight tile decoded once into L1, register-blocked vdpbf16ps over all x rows), and for
// int4 up to kTileMaxMInt4Cpu rows: the int4 tile kernel, compute-bound near the bf16 matmul's rate, still beats
// dequantise + oneDNN there (one thread, K = N = 8192, bf16 x: M = 33 29.5 vs 34.2 ms, 64 48.1 vs 54.5, 96 70.7 vs
// 79.7; M = 128 126 vs 98). int8's tile has no such margin over its GEMM path (its dequantise is cheap), so int8
// goes to "gemm" above kGemvMaxMCpu.
constexpr int64_t kGemvMaxMCpu = 32;
constexpr int64_t kTileMinMCpu = 6;
constexpr int64_t kTileMaxMInt4Cpu = 96;
// The largest M of the CPU "tile" range for a weight format (`bits` 4 or 8).
constexpr int64_t tile_max_m_cpu(int bits) { return bits == 4 ? kTileMaxMInt4Cpu : kGemvMaxMCpu; }
constexpr int64_t kGemvMaxMCuda = 8;

}  // namespace quant
}  // namespace nvlm
