// AVX2 + FMA fallback for the weight-only int4/int8 GEMV (interface: quant_kernels.h): plain fp32 FMAs, for CPUs
// without AVX512-BF16. Weights are decoded once per x-row block of up to 4 rows.
//  * int4: 8 bytes -> 8 dwords (vpmovzxbd); the low nibbles are the even k, the high nibbles the odd k, so x comes
//    de-interleaved per 16 k ([x0, x2, .., x14, x1, .., x15]); (q - z) is formed in fp32, the group scale is applied
//    once per group.
//  * int8: 8 bytes -> 8 dwords -> fp32, FMA with natural-order x; the channel scale multiplies the row sum.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/quant_kernels.h"

#define NVLM_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace nvlm {
namespace quant_cpu {
namespace {

NVLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MB>
NVLM_AVX2 void int4_row(const uint8_t* row, const float* s, const uint8_t* z, int64_t K, int64_t G, const float* x,
                        float* res) {
  const __m256i nib = _mm256_set1_epi32(0x0F);
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    const __m256 zf = _mm256_set1_ps(static_cast<float>(z[g] & 15));
    __m256 ae[MB], ao[MB];  // even-k and odd-k chains
    for (int m = 0; m < MB; ++m) ae[m] = ao[m] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
      const __m256 we = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d, nib)), zf);
      const __m256 wo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)), zf);
      for (int m = 0; m < MB; ++m) {
        ae[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + m * K + k), ae[m]);
        ao[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + m * K + k + 8), ao[m]);
      }
    }
    const __m256 sv = _mm256_set1_ps(s[g]);
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(ae[m], ao[m]), sv, acc[m]);
  }
  for (int m = 0; m < MB; ++m) res[m] = hsum(acc[m]);
}

template <int MB>
NVLM_AVX2 void int8_row(const int8_t* row, int64_t K, const float* x, float* res) {
  __m256 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
    const __m256 w1 =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8))));
    for (int m = 0; m < MB; ++m) {
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
      a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float t = hsum(_mm256_add_ps(a0[m], a1[m]));
    for (int64_t kk = k; kk < K; ++kk) t += static_cast<float>(row[kk]) * x[m * K + kk];
    res[m] = t;
  }
}

constexpr int kMaxMB = 4;

}  // namespace

NVLM_AVX2 void gemv_avx2(const QWeight& w, const float* x, const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M;
  const int64_t ngroups = w.bits == 4 ? K / w.group : 1;
#pragma omp parallel num_threads(out.threads)
  {
    std::vector<float> srow(ngroups);
    float res[kMaxMB];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float b = out.bias ? out.bias[n] : 0.f;
      float scale8 = 1.f;
      if (w.bits == 4) {
        for (int64_t g = 0; g < ngroups; ++g) srow[g] = scale_at(w.scales, w.stype, n * ngroups + g);
      } else {
        scale8 = scale_at(w.scales, w.stype, n);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, M - m0));
        const float* xb = x + m0 * K;
        if (w.bits == 4) {
          const uint8_t* row = static_cast<const uint8_t*>(w.qweight) + n * (K / 2);
          const uint8_t* zr = w.zeros + n * ngroups;
          switch (mb) {
            case 1: int4_row<1>(row, srow.data(), zr, K, w.group, xb, res); break;
            case 2: int4_row<2>(row, srow.data(), zr, K, w.group, xb, res); break;
            case 3: int4_row<3>(row, srow.data(), zr, K, w.group, xb, res); break;
            default: int4_row<4>(row, srow.data(), zr, K, w.group, xb, res); break;
          }
          for (int i = 0; i < mb; ++i) out.y[(m0 + i) * N + n] = res[i] + b;
        } else {
          const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
          switch (mb) {
            case 1: int8_row<1>(row, K, xb, res); break;
            case 2: int8_row<2>(row, K, xb, res); break;
            case 3: int8_row<3>(row, K, xb, res); break;
            default: int8_row<4>(row, K, xb, res); break;
          }
          for (int i = 0; i < mb; ++i) out.y[(m0 + i) * N + n] = res[i] * scale8 + b;
        }
      }
    }
  }
}

}  // namespace quant_cpu
}  // namespace nvlm
