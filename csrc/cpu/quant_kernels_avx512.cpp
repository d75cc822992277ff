// AVX-512 + AVX512-BF16 kernels for the weight-only int4/int8 linear (interface: quant_kernels.h).
//
// GEMV idea (memory-bound; every weight byte is streamed once and decoded in registers):
//  * int4: a 64-byte load holds 128 weights of one row. Read as 32 16-bit words, word i holds k = 4i..4i+3 of the
//    chunk in its four nibbles. Shifting by 4r and masking gives, per word lane, nibble r; `vpermw` then maps each
//    nibble q through a 16-entry table of bf16(q - z) for the group's zero point z: the weights come out as exact
//    bf16 values (-15..15) with the zero point already subtracted. `vdpbf16ps` multiplies them with bf16 x (whose
//    chunk was permuted to the same k order once per call) and accumulates pairs in fp32; the group's scale is
//    applied once per 128 weights with one FMA. For g = 64 / 32 a chunk spans 2 / 4 groups: the group number goes
//    into bit 4/5 of the index and the tables of 2 groups share one register (`vpermw`, 32 entries) or 4 groups
//    two registers (`vpermt2w`, 64 entries); the scale vector is built per fp32 lane.
//  * int8: 32 weights -> sign-extend -> fp32 -> bf16 (exact: |q| <= 128 fits bf16's 8-bit significand) ->
//    `vdpbf16ps`; the per-channel scale multiplies the row sum at the end.
//  * fp16 / fp32 activations are split into 2 / 3 bf16 parts whose sum is x exactly (8 significand bits each), so
//    the products stay exact and only fp32 accumulation rounds, as in an fp32 matmul.
// Several x rows (M <= 8 per block) share one decode of the weights; larger M loops over blocks while the row's
// packed weights (K/2 bytes) stay in L1.
//
// Dequantise-to-tile (GEMM path for large M): the same table lookup, with index bits built so that 32-bit lane j
// gets k = 2j in its low word and k = 2j+1 in its high word, i.e. natural order; then scaled in fp32.
// GCC 12 flags its own intrinsics headers (`__m512i __Y = __Y;` in _mm512_undefined_*) as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/quant_kernels.h"

#define NVLM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace nvlm {
namespace quant_cpu {
namespace {

// kCentered[z][q] = bf16 bits of (q - z): the zero point folded into the nibble lookup (exact small integers).
struct CenteredTable {
  alignas(64) uint16_t v[16][16];
  CenteredTable() {
    for (int z = 0; z < 16; ++z)
      for (int q = 0; q < 16; ++q) v[z][q] = quant::float_to_bf16_bits(static_cast<float>(q - z));
  }
};
const CenteredTable kCentered;

NVLM_AVX512BF16 inline __m256i table16(uint8_t z) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(kCentered.v[z & 15]));
}

NVLM_AVX512BF16 inline __m512 dp(__m512 acc, __m512i w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
}

// count scales from index i0 -> fp32 dst (16 at a time; the scalar scale_at per group cost as much as the GEMV).
NVLM_AVX512BF16 void scales_to_f32(const void* scales, ScaleType t, int64_t i0, int64_t count, float* dst) {
  int64_t i = 0;
  if (t == ScaleType::kF32) {
    std::copy_n(static_cast<const float*>(scales) + i0, count, dst);
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(scales) + i0;
  for (; i + 16 <= count; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512 f = t == ScaleType::kF16 ? _mm512_cvtph_ps(h)
                                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_storeu_ps(dst + i, f);
  }
  for (; i < count; ++i) dst[i] = scale_at(scales, t, i0 + i);
}

// Software prefetch distance for the weight stream (into L2). Measured on the 2-core Zen 4 dev machine, one thread
// streaming a 121 MB int4 weight: none 10 GB/s, T0 at 1-4 KiB 11-12.5 GB/s, T1 at 4 KiB 14 GB/s (plain read loop:
// 19-21 GB/s). The decode alone then no longer adds to the DRAM time. Past the end of the weights it is harmless.
constexpr int kPrefetchBytes = 4096;

NVLM_AVX512BF16 inline __mmask64 byte_mask(int64_t nbytes) {
  return nbytes >= 64 ? ~__mmask64(0) : ((__mmask64(1) << nbytes) - 1);
}

// ---- int4 GEMV: one output row n, MB rows of x, P bf16 parts of x -------------------------------------------------
// row: packed weights of n; s/z: its scales (fp32) and zeros; x: [MB][P][kpad] (chunk-permuted). Adds the
// contribution of chunks [c0, c1) to acc[m] (MB vectors of 16 fp32 partial sums, summed by the caller).
template <int G, int MB, int P>
NVLM_AVX512BF16 void int4_row(const uint8_t* row, const float* s, const uint8_t* z, int64_t K, const uint16_t* x,
                              int64_t kpad, int64_t c0, int64_t c1, float* acc_io) {
  const int64_t ngroups = K / G;
  const __m512i nib = _mm512_set1_epi16(0x000F);
  // Group-within-chunk bits of each 16-bit word lane i (k = 4i..4i+3): i*4/G, placed at bit 4 of the index.
  const __m512i gbits = _mm512_set_epi16(
      (31 * 4 / G) << 4, (30 * 4 / G) << 4, (29 * 4 / G) << 4, (28 * 4 / G) << 4, (27 * 4 / G) << 4,
      (26 * 4 / G) << 4, (25 * 4 / G) << 4, (24 * 4 / G) << 4, (23 * 4 / G) << 4, (22 * 4 / G) << 4,
      (21 * 4 / G) << 4, (20 * 4 / G) << 4, (19 * 4 / G) << 4, (18 * 4 / G) << 4, (17 * 4 / G) << 4,
      (16 * 4 / G) << 4, (15 * 4 / G) << 4, (14 * 4 / G) << 4, (13 * 4 / G) << 4, (12 * 4 / G) << 4,
      (11 * 4 / G) << 4, (10 * 4 / G) << 4, (9 * 4 / G) << 4, (8 * 4 / G) << 4, (7 * 4 / G) << 4, (6 * 4 / G) << 4,
      (5 * 4 / G) << 4, (4 * 4 / G) << 4, (3 * 4 / G) << 4, (2 * 4 / G) << 4, (1 * 4 / G) << 4, 0);
  // fp32 lane j sums word lanes 2j, 2j+1, i.e. k = 8j..8j+7: group 8j/G (only used for G = 32).
  const __m512i sidx = _mm512_set_epi32(15 * 8 / G, 14 * 8 / G, 13 * 8 / G, 12 * 8 / G, 11 * 8 / G, 10 * 8 / G,
                                        9 * 8 / G, 8 * 8 / G, 7 * 8 / G, 6 * 8 / G, 5 * 8 / G, 4 * 8 / G, 3 * 8 / G,
                                        2 * 8 / G, 1 * 8 / G, 0);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_loadu_ps(acc_io + 16 * m);

  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * kChunk;
    const uint8_t* p = row + k0 / 2;
    // K is a multiple of G >= 32, so a partial last chunk holds whole groups; masked-off bytes read as q = 0 and
    // meet zero-padded x.
    _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
    const __m512i wq = (k0 + kChunk <= K) ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(byte_mask((K - k0) / 2), p);
    __m512i i0 = _mm512_and_si512(wq, nib);
    __m512i i1 = _mm512_and_si512(_mm512_srli_epi16(wq, 4), nib);
    __m512i i2 = _mm512_and_si512(_mm512_srli_epi16(wq, 8), nib);
    __m512i i3 = _mm512_srli_epi16(wq, 12);
    __m512i w0, w1, w2, w3;
    __m512 sv;
    if constexpr (G == 128) {
      const __m512i tab = _mm512_zextsi256_si512(table16(z[c]));  // indices are < 16: the upper half is unused
      w0 = _mm512_permutexvar_epi16(i0, tab);
      w1 = _mm512_permutexvar_epi16(i1, tab);
      w2 = _mm512_permutexvar_epi16(i2, tab);
      w3 = _mm512_permutexvar_epi16(i3, tab);
      sv = _mm512_set1_ps(s[c]);
    } else if constexpr (G == 64) {
      const int64_t g0 = 2 * c, g1 = std::min<int64_t>(g0 + 1, ngroups - 1);
      const __m512i tab = _mm512_inserti64x4(_mm512_zextsi256_si512(table16(z[g0])), table16(z[g1]), 1);
      w0 = _mm512_permutexvar_epi16(_mm512_or_si512(i0, gbits), tab);
      w1 = _mm512_permutexvar_epi16(_mm512_or_si512(i1, gbits), tab);
      w2 = _mm512_permutexvar_epi16(_mm512_or_si512(i2, gbits), tab);
      w3 = _mm512_permutexvar_epi16(_mm512_or_si512(i3, gbits), tab);
      sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g0]), _mm512_set1_ps(s[g1]));
    } else {
      static_assert(G == 32, "int4 group size must be 32, 64 or 128");
      const int64_t g0 = 4 * c;
      const int64_t g1 = std::min<int64_t>(g0 + 1, ngroups - 1), g2 = std::min<int64_t>(g0 + 2, ngroups - 1),
                    g3 = std::min<int64_t>(g0 + 3, ngroups - 1);
      const __m512i ta = _mm512_inserti64x4(_mm512_zextsi256_si512(table16(z[g0])), table16(z[g1]), 1);
      const __m512i tb = _mm512_inserti64x4(_mm512_zextsi256_si512(table16(z[g2])), table16(z[g3]), 1);
      w0 = _mm512_permutex2var_epi16(ta, _mm512_or_si512(i0, gbits), tb);
      w1 = _mm512_permutex2var_epi16(ta, _mm512_or_si512(i1, gbits), tb);
      w2 = _mm512_permutex2var_epi16(ta, _mm512_or_si512(i2, gbits), tb);
      w3 = _mm512_permutex2var_epi16(ta, _mm512_or_si512(i3, gbits), tb);
      const __m512 s4 = _mm512_zextps128_ps512(_mm_set_ps(s[g3], s[g2], s[g1], s[g0]));
      sv = _mm512_permutexvar_ps(sidx, s4);
    }
    for (int m = 0; m < MB; ++m) {
      const uint16_t* xm = x + (int64_t)m * P * kpad + k0;
      if constexpr (MB >= 4) {  // enough independent x rows to hide the dpbf16 latency with one chain each
        __m512 a = _mm512_setzero_ps();
        for (int q = 0; q < P; ++q) {
          const uint16_t* xq = xm + (int64_t)q * kpad;
          a = dp(dp(dp(dp(a, w0, xq), w1, xq + 32), w2, xq + 64), w3, xq + 96);
        }
        acc[m] = _mm512_fmadd_ps(a, sv, acc[m]);
      } else {  // few rows: two chains per row
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int q = 0; q < P; ++q) {
          const uint16_t* xq = xm + (int64_t)q * kpad;
          a0 = dp(a0, w0, xq);
          a1 = dp(a1, w1, xq + 32);
          a0 = dp(a0, w2, xq + 64);
          a1 = dp(a1, w3, xq + 96);
        }
        acc[m] = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), sv, acc[m]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(acc_io + 16 * m, acc[m]);
}

// ---- int8 GEMV --------------------------------------------------------------------------------------------------
// Same contract as int4_row: chunks [c0, c1) of 128 k, partial sums in acc_io (no scale: applied per row later).
template <int MB, int P>
NVLM_AVX512BF16 void int8_row(const int8_t* row, int64_t K, const uint16_t* x, int64_t kpad, int64_t c0, int64_t c1,
                              float* acc_io) {
  constexpr int NA = MB == 1 ? 4 : (MB <= 3 ? 2 : 1);  // independent accumulator chains per x row
  __m512 acc[MB][NA];
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = _mm512_loadu_ps(acc_io + 16 * m);
    for (int a = 1; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  }
  for (int64_t k0 = c0 * kChunk; k0 < std::min(K, c1 * kChunk); k0 += kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k0) + kPrefetchBytes, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(row + k0) + kPrefetchBytes + 64, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const int64_t kk = k0 + 32 * r;
      if (kk >= K) break;
      const __m256i b = (kk + 32 <= K) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kk))
                                       : _mm256_maskz_loadu_epi8((__mmask32)byte_mask(K - kk), row + kk);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 <- k..k+15, 16..31 <- k+16..k+31
      for (int m = 0; m < MB; ++m)
        for (int q = 0; q < P; ++q) acc[m][r % NA] = dp(acc[m][r % NA], w, x + ((int64_t)m * P + q) * kpad + kk);
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
    for (int a = 1; a < NA; ++a) t = _mm512_add_ps(t, acc[m][a]);
    _mm512_storeu_ps(acc_io + 16 * m, t);
  }
}

using Int4Fn = void (*)(const uint8_t*, const float*, const uint8_t*, int64_t, const uint16_t*, int64_t, int64_t,
                        int64_t, float*);
using Int8Fn = void (*)(const int8_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*);

template <int G, int P>
Int4Fn int4_fn_mb(int mb) {
  switch (mb) {
    case 1: return &int4_row<G, 1, P>;
    case 2: return &int4_row<G, 2, P>;
    case 3: return &int4_row<G, 3, P>;
    case 4: return &int4_row<G, 4, P>;
    case 5: return &int4_row<G, 5, P>;
    case 6: return &int4_row<G, 6, P>;
    case 7: return &int4_row<G, 7, P>;
    default: return &int4_row<G, 8, P>;
  }
}

template <int G>
Int4Fn int4_fn_p(int parts, int mb) {
  return parts == 1 ? int4_fn_mb<G, 1>(mb) : parts == 2 ? int4_fn_mb<G, 2>(mb) : int4_fn_mb<G, 3>(mb);
}

Int4Fn int4_fn(int64_t group, int parts, int mb) {
  return group == 32 ? int4_fn_p<32>(parts, mb) : group == 64 ? int4_fn_p<64>(parts, mb) : int4_fn_p<128>(parts, mb);
}

template <int P>
Int8Fn int8_fn_mb(int mb) {
  switch (mb) {
    case 1: return &int8_row<1, P>;
    case 2: return &int8_row<2, P>;
    case 3: return &int8_row<3, P>;
    case 4: return &int8_row<4, P>;
    case 5: return &int8_row<5, P>;
    case 6: return &int8_row<6, P>;
    case 7: return &int8_row<7, P>;
    default: return &int8_row<8, P>;
  }
}

Int8Fn int8_fn(int parts, int mb) {
  return parts == 1 ? int8_fn_mb<1>(mb) : parts == 2 ? int8_fn_mb<2>(mb) : int8_fn_mb<3>(mb);
}

constexpr int kMaxMB = 8;   // x rows sharing one decode of the weights
constexpr int64_t kTileN = 16;  // output rows per k-blocked tile

}  // namespace

// Loop nest per thread: tiles of kTileN output rows (static split over threads) -> blocks of <= 8 x rows ->
// k-blocks -> rows of the tile -> 128-wide chunks. A k-block of the x block (<= 16 KiB of bf16 parts) stays in L1
// while every row of the tile uses it; the tile's packed weights (<= 16 x 4 KiB at K = 8192) stay in L2 across the
// x blocks, so DRAM sees each weight byte once. For M = 1 the whole of x fits in L1 and there is one k-block.
NVLM_AVX512BF16 void gemv_avx512bf16(const QWeight& w, const uint16_t* xparts, int parts, int64_t kpad,
                                     const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M;
  const int64_t ngroups = w.bits == 4 ? K / w.group : 1;
  const int64_t nblocks = (M + kMaxMB - 1) / kMaxMB;
  const int64_t nchunks = (K + kChunk - 1) / kChunk;  // kpad is the row stride (>= K rounded up to kChunk)
  const int last_mb = static_cast<int>(M - (nblocks - 1) * kMaxMB);
  const int full_mb = nblocks > 1 ? kMaxMB : last_mb;
  // k-block: as many chunks as keep one x block (mb rows x parts x 2 bytes) within 16 KiB. (Smaller k-blocks for
  // M = 1 split each weight row into pieces and defeat the sequential stream + prefetch: measured 1.7x slower.)
  const int64_t kb_chunks = std::max<int64_t>(1, (16 << 10) / (int64_t(full_mb) * parts * 2 * kChunk));
  Int4Fn f4_full = nullptr, f4_last = nullptr;
  Int8Fn f8_full = nullptr, f8_last = nullptr;
  if (w.bits == 4) {
    f4_full = int4_fn(w.group, parts, full_mb);
    f4_last = int4_fn(w.group, parts, last_mb);
  } else {
    f8_full = int8_fn(parts, full_mb);
    f8_last = int8_fn(parts, last_mb);
  }
  const int64_t ntiles = (N + kTileN - 1) / kTileN;
#pragma omp parallel num_threads(out.threads)
  {
    std::vector<float> srow(kTileN * ngroups);
    alignas(64) float acc[kTileN][kMaxMB * 16];
    // Dynamic: on a shared machine one thread is often descheduled for a time slice; with a static split the call
    // then waits for it (measured: M=16 took 2x its single-thread CPU time with 2 threads). Tiles are 16 rows
    // (64 KiB of int4 at K=8192), so handing them out costs nothing measurable.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
      scales_to_f32(w.scales, w.stype, n0 * ngroups, nt * ngroups, srow.data());  // the tile's rows: contiguous
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t m0 = blk * kMaxMB;
        const bool last = blk + 1 == nblocks;
        const int mb = last ? last_mb : kMaxMB;
        const uint16_t* xb = xparts + m0 * parts * kpad;
        for (int64_t i = 0; i < nt; ++i) std::fill(acc[i], acc[i] + mb * 16, 0.f);
        for (int64_t c0 = 0; c0 < nchunks; c0 += kb_chunks) {
          const int64_t c1 = std::min(nchunks, c0 + kb_chunks);
          for (int64_t i = 0; i < nt; ++i) {
            const int64_t n = n0 + i;
            if (w.bits == 4) {
              const uint8_t* row = static_cast<const uint8_t*>(w.qweight) + n * (K / 2);
              (last ? f4_last : f4_full)(row, &srow[i * ngroups], w.zeros + n * ngroups, K, xb, kpad, c0, c1, acc[i]);
            } else {
              const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
              (last ? f8_last : f8_full)(row, K, xb, kpad, c0, c1, acc[i]);
            }
          }
        }
        for (int64_t i = 0; i < nt; ++i) {
          const int64_t n = n0 + i;
          const float b = out.bias ? out.bias[n] : 0.f;
          const float s8 = w.bits == 8 ? srow[i] : 1.f;
          for (int m = 0; m < mb; ++m)
            out.y[(m0 + m) * N + n] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 16 * m)) * s8 + b;
        }
      }
    }
  }
}

// ---- Dequantise rows to a dense tile ------------------------------------------------------------------------------
namespace {

// 32 int4 weights (16 bytes at p) of one group -> two fp32 vectors (k order 0..15, 16..31), already scaled.
NVLM_AVX512BF16 inline void int4_32_f32(const uint8_t* p, __m512i tab, __m512 sv, __m512& lo, __m512& hi) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // dword j = byte j = (k=2j) | (k=2j+1) << 4  ->  index words (low nibble, high nibble) = natural k order.
  const __m512i idx = _mm512_and_si512(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), _mm512_set1_epi32(0x000F000F));
  const __m512i wb = _mm512_permutexvar_epi16(idx, tab);  // 32 bf16 (q - z), natural order
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(wb)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(wb, 1)), 16));
  lo = _mm512_mul_ps(lo, sv);
  hi = _mm512_mul_ps(hi, sv);
}

template <bool kBf16>
NVLM_AVX512BF16 void dequant_rows(const QWeight& w, int64_t n0, int64_t n1, void* dst_v, int threads) {
  const int64_t K = w.K;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = n0; n < n1; ++n) {
    uint16_t* db = static_cast<uint16_t*>(dst_v) + (n - n0) * K;
    float* df = static_cast<float*>(dst_v) + (n - n0) * K;
    if (w.bits == 4) {
      const int64_t G = w.group, ngroups = K / G;
      const uint8_t* row = static_cast<const uint8_t*>(w.qweight) + n * (K / 2);
      for (int64_t g = 0; g < ngroups; ++g) {
        const __m512i tab = _mm512_zextsi256_si512(table16(w.zeros[n * ngroups + g]));
        const __m512 sv = _mm512_set1_ps(scale_at(w.scales, w.stype, n * ngroups + g));
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          __m512 lo, hi;
          int4_32_f32(row + k / 2, tab, sv, lo, hi);
          if constexpr (kBf16) {
            _mm512_storeu_si512(db + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          } else {
            _mm512_storeu_ps(df + k, lo);
            _mm512_storeu_ps(df + k + 16, hi);
          }
        }
      }
    } else {
      const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
      const float s = scale_at(w.scales, w.stype, n);
      const __m512 sv = _mm512_set1_ps(s);
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        const __m512 lo = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), sv);
        const __m512 hi = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)))),
            sv);
        if constexpr (kBf16) {
          _mm512_storeu_si512(db + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        } else {
          _mm512_storeu_ps(df + k, lo);
          _mm512_storeu_ps(df + k + 16, hi);
        }
      }
      for (; k < K; ++k) {
        const float v = quant::int8_dequant(row[k], s);
        if constexpr (kBf16) db[k] = quant::float_to_bf16_bits(v);
        else df[k] = v;
      }
    }
  }
}

}  // namespace

NVLM_AVX512BF16 void dequant_rows_avx512_bf16(const QWeight& w, int64_t n0, int64_t n1, uint16_t* dst, int threads) {
  dequant_rows<true>(w, n0, n1, dst, threads);
}

NVLM_AVX512BF16 void dequant_rows_avx512_f32(const QWeight& w, int64_t n0, int64_t n1, float* dst, int threads) {
  dequant_rows<false>(w, n0, n1, dst, threads);
}

}  // namespace quant_cpu
}  // namespace nvlm
