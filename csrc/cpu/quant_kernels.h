// Internal interface between the weight-only quantised linear entry points (quant_linear.cpp) and the per-ISA
// kernels (quant_kernels_avx512.cpp, quant_kernels_avx2.cpp, scalar in quant_linear.cpp). Plain pointers only, so
// the ISA files need no ATen headers and nothing in them is compiled for a wider ISA than its target attribute.
//
// Every kernel computes  out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])  in fp32 for m < M and n < N, with w the
// dequantised weight of csrc/common/quant_layout.h, writing a row-major fp32 [M, N] buffer. The caller converts
// to the activation dtype. Kernels parallelise over n with OpenMP (`#pragma omp parallel for` inside the
// target-attributed function, see build_notes.md).
#pragma once

#include <cstdint>

#include "common/quant_layout.h"

namespace nvlm {
namespace quant_cpu {

enum class ScaleType { kF32 = 0, kF16 = 1, kBF16 = 2 };

// The quantised weight, read in its file layout (no repacking).
struct QWeight {
  int bits;                // 4 or 8
  const void* qweight;     // int8 [N, K] or uint8 [N, K/2]
  const void* scales;      // [N] (int8) or [N, K/g] (int4), of type stype
  ScaleType stype;
  const uint8_t* zeros;    // uint8 [N, K/g] (int4 only)
  int64_t N, K, group;     // group: int4 group size (unused for int8)
};

struct Out {
  float* y;                // fp32 [M, N]
  const float* bias;       // fp32 [N] or nullptr
  int64_t M;
  int threads;             // OpenMP threads (torch.get_num_threads())
};

// Scale s[i] of a row as fp32 (fp16/bf16 scales are converted exactly).
float scale_at(const void* scales, ScaleType t, int64_t i);

// ---- AVX-512 + AVX512-BF16 (vdpbf16ps) ------------------------------------------------------------------------------
// x is given as P bf16 "parts" whose sum is x exactly (P = 1 for bf16, 2 for fp16, 3 for fp32 activations; see
// quant_linear.cpp), laid out [M][P][kpad]: kpad (the row stride) >= K rounded up to 128, zero padded. The stride
// is deliberately not a multiple of 4 KiB: 8 x rows 16 KiB apart would all map to the same L1 sets. For int4 each
// 128-wide chunk is permuted: position 32*r + i of a chunk holds k = 4*i + r (the order in which the kernel unpacks
// nibbles from 16-bit words); for int8 the order is natural.
constexpr int64_t kChunk = 128;
// xgsum fp32 [M][K/g]: per-group sums of x (int4 with parts <= 2 only, else unused). For bf16/fp16 x the int4
// kernel decodes each nibble q as the bf16 bit pattern 0x4300 | q = 128 + q (exact; no table lookup) and removes
// the offset once per row and group: sum_k x (q - z) s = s (sum_k x (128 + q) - (128 + z) sum_k x). The larger
// partial sums cost some fp32 accumulation accuracy (~2^-24 * 143 * sum|x| * s), far below bf16/fp16 output
// rounding; fp32 activations (3 parts) keep the exact table decode of (q - z).
void gemv_avx512bf16(const QWeight& w, const uint16_t* xparts, int parts, int64_t kpad, const float* xgsum,
                     const Out& out);
// Tiled kernel for the middle range of M (quant_kernels_avx512.cpp): x and xgsum as for the GEMV except that x is
// in natural k order for int4 too (the kernel lays it out itself), x viewed as `rows` bf16 rows of stride kpad
// (row m * parts + p is part p of x row m), rows = M * parts rounded up to a multiple of 4, the extra rows zero.
void tiled_avx512bf16(const QWeight& w, const uint16_t* xrows, int64_t rows, int parts, int64_t kpad,
                      const float* xgsum, const Out& out);
// Dequantise rows [n0, n1) to bf16 bits (dst [n1-n0, K]) or fp32 (dst [n1-n0, K]).
void dequant_rows_avx512_bf16(const QWeight& w, int64_t n0, int64_t n1, uint16_t* dst, int threads);
void dequant_rows_avx512_f32(const QWeight& w, int64_t n0, int64_t n1, float* dst, int threads);

// ---- AVX2 + FMA (fp32 FMAs) ---------------------------------------------------------------------------------------
// x fp32 [M][K]; for int4 each 16-wide block of k is de-interleaved: [x0, x2, .., x14, x1, x3, .., x15].
void gemv_avx2(const QWeight& w, const float* x, const Out& out);

// ---- Portable scalar ----------------------------------------------------------------------------------------------
void gemv_scalar(const QWeight& w, const float* x, const Out& out);                 // x fp32 [M][K], natural order
void dequant_rows_scalar(const QWeight& w, int64_t n0, int64_t n1, float* dst, int threads);

}  // namespace quant_cpu
}  // namespace nvlm
