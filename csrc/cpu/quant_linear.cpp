// CPU implementation of nvlm_kernels::w8a16_linear / w4a16_linear (schemas in csrc/ops.cpp; format in
// csrc/common/quant_layout.h and nvlm_kernels/packing.py):  y[..., N] = x[..., K] @ dequant(w)^T (+ bias).
//
// Routing by M = rows of x (quant::kTileMinMCpu = 6, kGemvMaxMCpu = 32, kTileMaxMInt4Cpu = 96: the numbers of
// quant_linear.select_kernel):
//   * "gemv" (M < 6; M <= 32 without AVX512-BF16): stream the packed weights once and decode them in registers
//       AVX-512 + AVX512-BF16 -> quant_kernels_avx512.cpp (vdpbf16ps on exact bf16 weights)
//       AVX2 + FMA             -> quant_kernels_avx2.cpp   (fp32 FMAs)
//       otherwise              -> quant_kernels_scalar.cpp
//   * "tile" (6 <= M <= 32, int4 up to M = 96; AVX512-BF16 only): decode a 16-row weight tile once into L1 and
//     multiply it with all x rows by a register-blocked vdpbf16ps micro-kernel (quant_kernels_avx512.cpp,
//     tiled_avx512bf16). Measured one thread, K = N = 8192, bf16 x (median of 7): M = 6 int4 9.0 / int8 10.8 ms
//     vs GEMV 9.6 / 12.7, M = 7 8.9 / 10.5 vs 11.5 / 15.5; M = 4 the GEMV wins (6.3 / 8.3 vs 7.3 / 7.8), M = 5 for
//     int4 (7.7 vs 8.9). int4 M = 33-96: quant_layout.h.
//   * "gemm" (M > 32; int4 with AVX512-BF16: M > 96): dequantise a tile of weight rows (~16 MiB) to bf16 (bf16
//     activations) or fp32, multiply with at::mm (oneDNN), repeat over N. The weights are still read from memory
//     once.
// NVLM_KERNELS_CPU_ISA=avx2|scalar caps the SIMD level per call (tests exercise every path on one machine).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/quant_checks.h"
#include "common/cpu_features.h"
#include "common/quant_layout.h"
#include "cpu/quant_kernels.h"

namespace {

using nvlm::quant_cpu::Out;
using nvlm::quant_cpu::QWeight;
using nvlm::quant_cpu::ScaleType;

enum class Isa { kAvx512Bf16, kAvx2, kScalar };

Isa pick_isa() {
  const auto cap = nvlm::cpu_capability();  // reads NVLM_KERNELS_CPU_ISA on every call
#if defined(__x86_64__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  if (cap == nvlm::CpuCapability::kAvx512 && bf16) return Isa::kAvx512Bf16;
#endif
  if (cap >= nvlm::CpuCapability::kAvx2) return Isa::kAvx2;  // AVX-512 without BF16 also lands here
  return Isa::kScalar;
}

ScaleType scale_type(const at::Tensor& s) {
  switch (s.scalar_type()) {
    case at::kHalf: return ScaleType::kF16;
    case at::kBFloat16: return ScaleType::kBF16;
    default: return ScaleType::kF32;
  }
}

// Split fp32 v into P bf16 values whose sum is v exactly for P = 2 (v from fp16) and P = 3 (v from fp32).
inline void split_bf16(float v, int parts, uint16_t* out, int64_t stride) {
  for (int p = 0; p < parts; ++p) {
    const uint16_t h = nvlm::quant::float_to_bf16_bits(v);
    out[p * stride] = h;
    v -= nvlm::quant::bf16_bits_to_float(h);
  }
}

// x [M, K] -> bf16 parts [M][P][kpad] for the AVX-512 kernels (layout: quant_kernels.h), then zero rows up to
// `rows_multiple`. permute: the int4 GEMV's chunk order; otherwise natural order.
at::Tensor prepare_x_bf16(const at::Tensor& x2, bool permute, int64_t kpad, int64_t rows_multiple, int* parts_out) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int parts = x2.scalar_type() == at::kBFloat16 ? 1 : x2.scalar_type() == at::kHalf ? 2 : 3;
  *parts_out = parts;
  const int64_t rows = (M * parts + rows_multiple - 1) / rows_multiple * rows_multiple;
  auto xp = at::empty({rows, kpad}, x2.options().dtype(at::kShort));
  auto* dst = reinterpret_cast<uint16_t*>(xp.data_ptr<int16_t>());
  // Zero only what the loops below may leave unwritten, before they run: from the last (partial) 128-k chunk on in
  // every row (the permutation moves k within a chunk), and the extra rows. The kernels read the zeros.
  const int64_t k_tail = K / nvlm::quant_cpu::kChunk * nvlm::quant_cpu::kChunk;
  for (int64_t r = 0; r < M * parts; ++r) std::fill(dst + r * kpad + k_tail, dst + (r + 1) * kpad, uint16_t(0));
  std::fill(dst + M * parts * kpad, dst + rows * kpad, uint16_t(0));
  auto pos = [permute](int64_t k) -> int64_t {  // int4 GEMV: k = 4i + r of a 128-chunk goes to 32r + i
    if (!permute) return k;
    const int64_t c = k & ~int64_t(127), j = k & 127;
    return c + (j & 3) * 32 + (j >> 2);
  };
  if (parts == 1) {
    const auto* src = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * kpad + pos(k)] = src[m * K + k];
  } else {
    const auto xf = x2.to(at::kFloat).contiguous();  // exact for fp16
    const float* src = xf.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) split_bf16(src[m * K + k], parts, dst + m * parts * kpad + pos(k), kpad);
  }
  return xp;
}

// Per-group sums of bf16 / fp16 x [M, K] for the int4 offset decode (quant_kernels.h): fp32 [M][K/g], each summed in
// fp64 (exact for any realistic spread of exponents, so the order does not matter) and rounded once. Plain loops,
// not ATen ops: for a small model's layers the 4 ATen calls cost as much as the kernel.
std::vector<float> group_sums(const at::Tensor& x2, int64_t group) {
  const int64_t M = x2.size(0), K = x2.size(1), ngroups = K / group;
  std::vector<float> sums(M * ngroups);
  const bool bf16 = x2.scalar_type() == at::kBFloat16;
  const auto* src = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  auto value = [bf16](uint16_t h) -> double {  // the shared bit conversions the scalar kernels use
    return bf16 ? nvlm::quant::bf16_bits_to_float(h) : nvlm::quant::half_bits_to_float(h);
  };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ngroups; ++g) {
      const uint16_t* v = src + m * K + g * group;
      double acc[4] = {0.0, 0.0, 0.0, 0.0};  // 4 chains: the adds are exact, so only their latency matters
      for (int64_t k = 0; k < group; k += 4)
        for (int j = 0; j < 4; ++j) acc[j] += value(v[k + j]);
      sums[m * ngroups + g] = static_cast<float>((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  return sums;
}

// x [M, K] -> fp32 [M, K]; for int4 on AVX2 each 16-k block de-interleaved (even k, then odd k).
at::Tensor prepare_x_f32(const at::Tensor& x2, int bits, bool deinterleave) {
  auto xf = x2.to(at::kFloat).contiguous();
  if (bits != 4 || !deinterleave) return xf;
  const int64_t M = xf.size(0), K = xf.size(1);  // K is a multiple of the group size, hence of 16
  return xf.view({M, K / 16, 8, 2}).transpose(2, 3).contiguous().view({M, K});
}

at::Tensor run(const at::Tensor& x, const QWeight& w, const std::optional<at::Tensor>& bias) {
  const int64_t K = w.K, N = w.N;
  const int64_t M = K > 0 ? x.numel() / K : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return at::zeros(out_shape, x.options());
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const int threads = at::get_num_threads();
  const Isa isa = pick_isa();
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));

  // The tile range (AVX512-BF16 only) reaches past the GEMV range for int4 (quant_layout.h).
  const bool tiled = isa == Isa::kAvx512Bf16 && M >= nvlm::quant::kTileMinMCpu &&
                     M <= nvlm::quant::tile_max_m_cpu(w.bits);
  if (M <= nvlm::quant::kGemvMaxMCpu || tiled) {  // ---- gemv / tile
    const Out out{y.data_ptr<float>(), bptr, M, threads};
    // Row stride: K rounded up to a chunk, plus 128 bytes so that rows do not alias in L1 (quant_kernels.h).
    const int64_t kpad =
        (K + nvlm::quant_cpu::kChunk - 1) / nvlm::quant_cpu::kChunk * nvlm::quant_cpu::kChunk + 64;
    if (isa == Isa::kAvx512Bf16) {
      int parts = 1;
      // int4: the GEMV's chunk order; the tile path lays x out itself from natural order.
      const auto xp =
          prepare_x_bf16(x2, /*permute=*/w.bits == 4 && !tiled, kpad, /*rows_multiple=*/tiled ? 4 : 1, &parts);
      const auto* xbits = reinterpret_cast<const uint16_t*>(xp.data_ptr<int16_t>());
      const std::vector<float> xgsum = w.bits == 4 && parts <= 2 ? group_sums(x2, w.group) : std::vector<float>();
      const float* gs = xgsum.empty() ? nullptr : xgsum.data();
      if (tiled)
        nvlm::quant_cpu::tiled_avx512bf16(w, xbits, xp.size(0), parts, kpad, gs, out);
      else
        nvlm::quant_cpu::gemv_avx512bf16(w, xbits, parts, kpad, gs, out);
    } else if (isa == Isa::kAvx2) {
      const auto xf = prepare_x_f32(x2, w.bits, /*deinterleave=*/true);
      nvlm::quant_cpu::gemv_avx2(w, xf.data_ptr<float>(), out);
    } else {
      const auto xf = prepare_x_f32(x2, w.bits, /*deinterleave=*/false);
      nvlm::quant_cpu::gemv_scalar(w, xf.data_ptr<float>(), out);
    }
  } else {  // ---- gemm: dequantised tiles of rows + at::mm
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const at::Tensor xc = bf16 ? x2 : x2.to(at::kFloat);
    const auto ct = bf16 ? at::kBFloat16 : at::kFloat;
    const int64_t elt = bf16 ? 2 : 4;
    // ~16 MiB tiles: few enough parallel regions (each dequantise + matmul pair is two OpenMP barriers, and on a
    // shared 2-core machine a barrier can wait a whole scheduler time slice), and about half the last-level cache.
    const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(N, (int64_t(16) << 20) / (K * elt)) / 16 * 16);
    auto tile = at::empty({rows, K}, x.options().dtype(ct));
    at::Tensor tile_f = (isa != Isa::kAvx512Bf16 && bf16) ? at::empty({rows, K}, x.options().dtype(at::kFloat))
                                                           : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n1 = std::min(N, n0 + rows);
      if (isa == Isa::kAvx512Bf16) {
        if (bf16)
          nvlm::quant_cpu::dequant_rows_avx512_bf16(w, n0, n1, reinterpret_cast<uint16_t*>(tile.data_ptr()),
                                                    threads);
        else
          nvlm::quant_cpu::dequant_rows_avx512_f32(w, n0, n1, tile.data_ptr<float>(), threads);
      } else if (bf16) {
        nvlm::quant_cpu::dequant_rows_scalar(w, n0, n1, tile_f.data_ptr<float>(), threads);
        tile.narrow(0, 0, n1 - n0).copy_(tile_f.narrow(0, 0, n1 - n0));
      } else {
        nvlm::quant_cpu::dequant_rows_scalar(w, n0, n1, tile.data_ptr<float>(), threads);
      }
      y.narrow(1, n0, n1 - n0).copy_(at::mm(xc, tile.narrow(0, 0, n1 - n0).t()));
    }
    // With bf16 x the product is already rounded to bf16, so the bias makes a second rounding (error up to ~1 ulp
    // of y, not 1/2). Fusing it (at::addmm) rounds once but broke tensor parallelism's bit-exactness: oneDNN's
    // addmm result changed with the rank's slice of N (tests/tp). Left as is.
    if (bias.has_value()) y.add_(bias_f);
  }
  return y.to(x.scalar_type()).view(out_shape);
}

at::Tensor w8a16_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
  const nvlm::QuantShape sh = nvlm::check_w8a16_args(x, qweight, scale, bias);
  const int64_t n = sh.n, k = sh.k;
  const QWeight w{8, qweight.data_ptr(), scale.data_ptr(), scale_type(scale), nullptr, n, k, 0};
  return run(x, w, bias);
}

at::Tensor w4a16_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const nvlm::QuantShape sh = nvlm::check_w4a16_args(x, qweight, scales, zeros, group_size, bias);
  const int64_t n = sh.n, k = sh.k;
  const QWeight w{4, qweight.data_ptr(), scales.data_ptr(), scale_type(scales), zeros.data_ptr<uint8_t>(), n, k,
                  group_size};
  return run(x, w, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CPU, m) {
  m.impl("w8a16_linear", &w8a16_linear_cpu);
  m.impl("w4a16_linear", &w4a16_linear_cpu);
}
