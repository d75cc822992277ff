// Portable scalar kernels for the weight-only int4/int8 linear (interface: quant_kernels.h). They use only the
// csrc/common/quant_layout.h helpers, so they double as a readable statement of what the SIMD kernels compute.
#include <vector>

#include "cpu/quant_kernels.h"

namespace nvlm {
namespace quant_cpu {

float scale_at(const void* scales, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::kF16: return quant::half_bits_to_float(static_cast<const uint16_t*>(scales)[i]);
    case ScaleType::kBF16: return quant::bf16_bits_to_float(static_cast<const uint16_t*>(scales)[i]);
    default: return static_cast<const float*>(scales)[i];
  }
}

void gemv_scalar(const QWeight& w, const float* x, const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M;
#pragma omp parallel for schedule(static) num_threads(out.threads)
  for (int64_t n = 0; n < N; ++n) {
    const float b = out.bias ? out.bias[n] : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      if (w.bits == 4) {
        const int64_t G = w.group, ngroups = K / G;
        const uint8_t* row = static_cast<const uint8_t*>(w.qweight) + n * (K / 2);
        for (int64_t g = 0; g < ngroups; ++g)
          acc += quant::int4_group_dot(row, g * G, G, scale_at(w.scales, w.stype, n * ngroups + g),
                                       w.zeros[n * ngroups + g] & 15, xm + g * G);
      } else {
        const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(row[k]) * xm[k];
        acc *= scale_at(w.scales, w.stype, n);
      }
      out.y[m * N + n] = acc + b;
    }
  }
}

void dequant_rows_scalar(const QWeight& w, int64_t n0, int64_t n1, float* dst, int threads) {
  const int64_t K = w.K;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = n0; n < n1; ++n) {
    float* d = dst + (n - n0) * K;
    if (w.bits == 4) {
      const int64_t G = w.group, ngroups = K / G;
      const uint8_t* row = static_cast<const uint8_t*>(w.qweight) + n * (K / 2);
      for (int64_t g = 0; g < ngroups; ++g)
        quant::int4_dequant_group(row, g * G, G, scale_at(w.scales, w.stype, n * ngroups + g),
                                  w.zeros[n * ngroups + g] & 15, d + g * G);
    } else {
      const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
      const float s = scale_at(w.scales, w.stype, n);
      for (int64_t k = 0; k < K; ++k) d[k] = quant::int8_dequant(row[k], s);
    }
  }
}

}  // namespace quant_cpu
}  // namespace nvlm
