// CPU implementation of nvlm_kernels::w8a16_linear / w4a16_linear (schemas in csrc/ops.cpp; format in
// csrc/common/quant_layout.h and nvlm_kernels/packing.py):  y[..., N] = x[..., K] @ dequant(w)^T (+ bias).
//
// Routing by M = rows of x (quant::kGemvMaxMCpu = 32, the same numbers as quant_linear.select_kernel):
//   * "gemv" (M <= 32): stream the packed weights once and decode them in registers
//       AVX-512 + AVX512-BF16 -> quant_kernels_avx512.cpp (vdpbf16ps on exact bf16 weights)
//       AVX2 + FMA             -> quant_kernels_avx2.cpp   (fp32 FMAs)
//       otherwise              -> quant_kernels_scalar.cpp
//   * "gemm" (M > 32): dequantise a tile of weight rows (~16 MiB) to bf16 (bf16 activations) or
//     fp32, multiply with at::mm (oneDNN), repeat over N. The weights are still read from memory once.
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

// x [M, K] -> bf16 parts [M][P][kpad] for the AVX-512 kernels (layout: quant_kernels.h).
at::Tensor prepare_x_bf16(const at::Tensor& x2, int bits, int64_t kpad, int* parts_out) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int parts = x2.scalar_type() == at::kBFloat16 ? 1 : x2.scalar_type() == at::kHalf ? 2 : 3;
  *parts_out = parts;
  auto xp = at::zeros({M, parts, kpad}, x2.options().dtype(at::kShort));
  auto* dst = reinterpret_cast<uint16_t*>(xp.data_ptr<int16_t>());
  auto pos = [bits](int64_t k) -> int64_t {  // int4: k = 4i + r of a 128-chunk goes to 32r + i
    if (bits == 8) return k;
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

  if (M <= nvlm::quant::kGemvMaxMCpu) {  // ---- gemv
    const Out out{y.data_ptr<float>(), bptr, M, threads};
    if (isa == Isa::kAvx512Bf16) {
      // Row stride: K rounded up to a chunk, plus 128 bytes so that rows do not alias in L1 (quant_kernels.h).
      const int64_t kpad =
          (K + nvlm::quant_cpu::kChunk - 1) / nvlm::quant_cpu::kChunk * nvlm::quant_cpu::kChunk + 64;
      int parts = 1;
      const auto xp = prepare_x_bf16(x2, w.bits, kpad, &parts);
      nvlm::quant_cpu::gemv_avx512bf16(w, reinterpret_cast<const uint16_t*>(xp.data_ptr<int16_t>()), parts, kpad,
                                       out);
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
    if (bias.has_value()) y.add_(bias_f);
  }
  return y.to(x.scalar_type()).view(out_shape);
}

at::Tensor w8a16_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
  NVLM_CHECK_ARG(qweight.scalar_type() == at::kChar, "qweight", "must be int8, got ", qweight.scalar_type());
  NVLM_CHECK_DIM(qweight, "qweight", 2);
  const int64_t n = qweight.size(0), k = qweight.size(1);
  nvlm::check_quant_linear_common("w8a16_linear", x, qweight, scale, bias, n, k);
  NVLM_CHECK_ARG(scale.dim() == 1 && scale.size(0) == n, "scale", "must have shape [", n, "], got ", scale.sizes());
  const QWeight w{8, qweight.data_ptr(), scale.data_ptr(), scale_type(scale), nullptr, n, k, 0};
  return run(x, w, bias);
}

at::Tensor w4a16_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  NVLM_CHECK_ARG(qweight.scalar_type() == at::kByte, "qweight", "must be uint8 (two int4 per byte), got ",
                 qweight.scalar_type());
  NVLM_CHECK_DIM(qweight, "qweight", 2);
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1);
  NVLM_CHECK_ARG(nvlm::quant::valid_group_size(group_size), "group_size", "must be 32, 64 or 128, got ", group_size);
  NVLM_CHECK_ARG(k % group_size == 0, "group_size", "K=", k, " is not a multiple of group_size=", group_size);
  nvlm::check_quant_linear_common("w4a16_linear", x, qweight, scales, bias, n, k);
  const int64_t g = k / group_size;
  NVLM_CHECK_ARG(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == g, "scales", "must have shape [", n,
                 ", ", g, "], got ", scales.sizes());
  NVLM_CHECK_ARG(zeros.scalar_type() == at::kByte, "zeros", "must be uint8, got ", zeros.scalar_type());
  NVLM_CHECK_ARG(zeros.dim() == 2 && zeros.size(0) == n && zeros.size(1) == g, "zeros", "must have shape [", n, ", ",
                 g, "], got ", zeros.sizes());
  NVLM_CHECK_CONTIGUOUS(zeros, "zeros");
  NVLM_CHECK_SAME_DEVICE(x, "x", zeros, "zeros");
  const QWeight w{4, qweight.data_ptr(), scales.data_ptr(), scale_type(scales), zeros.data_ptr<uint8_t>(), n, k,
                  group_size};
  return run(x, w, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CPU, m) {
  m.impl("w8a16_linear", &w8a16_linear_cpu);
  m.impl("w4a16_linear", &w4a16_linear_cpu);
}
