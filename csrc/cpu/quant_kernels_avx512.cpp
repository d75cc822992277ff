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
//  * int4 with bf16 / fp16 x: the offset decode instead of the table: word lane = 0x4300 | q, which is the bf16
//    bit pattern of 128 + q (exact for q < 128), built by byte unpacks against 0x43 in the GEMV (it reorders x
//    once per call to match) and by one shift + one ternary-logic op in the tile path. The offset and
//    the zero point are removed once per row and group: sum_k x (q - z) s = s (sum_k x (128 + q) - (128 + z) S_g)
//    with S_g = sum of x over the group (computed once per call, shared by all N rows). Products stay exact; the
//    fp32 partial sums are ~10x larger, which costs ~2^-24 * 143 * s * sum|x| of accumulation error: far below
//    bf16 / fp16 output rounding. fp32 x (3 parts) keeps the exact table decode.
// For quant::kTileMinMCpu <= M <= 32 (int4: up to quant::kTileMaxMInt4Cpu) the tiled kernels below are used
// instead (see there).
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

// kCenteredTable32.v[j] = bf16 bits of (j - 16): q - z looked up at index q + 16 - z (int4 tile, fp32 x).
struct CenteredTable32 {
  alignas(64) uint16_t v[32];
  CenteredTable32() {
    for (int j = 0; j < 32; ++j) v[j] = quant::float_to_bf16_bits(static_cast<float>(j - 16));
  }
};
const CenteredTable32 kCenteredTable32;

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
// Re-measured with the offset decode (one thread, CPU time, min of 12): T1 at 2 / 4 / 8 / 16 KiB 11.3 / 14.7-15.6 /
// 14.7 / 14.1 GB/s, T2 at 4-16 KiB 14.3-15.8, T0 8.9, NTA 11.9 (torch sum, one thread: 22 GB/s); the decode alone
// runs at ~21 GB/s per core from L2, so one core cannot stream faster than ~15 GB/s.
constexpr int kPrefetchBytes = 4096;

NVLM_AVX512BF16 inline __mmask64 byte_mask(int64_t nbytes) {
  return nbytes >= 64 ? ~__mmask64(0) : ((__mmask64(1) << nbytes) - 1);
}

// The scale of each fp32 lane's group for one 128-k chunk c: in both decode orders below, fp32 lane j only sums
// products of the chunk's group 8j / G (the unpack order permutes k within blocks of 32 = 4 lanes); groups past the
// row's end repeat the last one (its masked tail).
template <int G>
NVLM_AVX512BF16 inline __attribute__((always_inline)) __m512 chunk_scales(const float* s, int64_t c,
                                                                          int64_t ngroups) {
  static_assert(G == 32 || G == 64 || G == 128, "int4 group size must be 32, 64 or 128");
  if constexpr (G == 128) {
    return _mm512_set1_ps(s[c]);
  } else if constexpr (G == 64) {
    const int64_t g0 = 2 * c, g1 = std::min<int64_t>(g0 + 1, ngroups - 1);
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g0]), _mm512_set1_ps(s[g1]));
  } else {
    const int64_t g0 = 4 * c;
    const int64_t g1 = std::min<int64_t>(g0 + 1, ngroups - 1), g2 = std::min<int64_t>(g0 + 2, ngroups - 1),
                  g3 = std::min<int64_t>(g0 + 3, ngroups - 1);
    const __m512i lane_group = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // j -> j / 4
    return _mm512_permutexvar_ps(lane_group, _mm512_zextps128_ps512(_mm_set_ps(s[g3], s[g2], s[g1], s[g0])));
  }
}

// Decode one 128-k chunk of a packed int4 row (wq: its 64 bytes; chunk index c) into four bf16 vectors: word lane
// i of w_r holds k = 4i + r of the chunk, as the exact bf16(q - z) by table lookup (the GEMV with fp32 x). sv: the
// scale of each fp32 lane's group.
template <int G>
NVLM_AVX512BF16 inline __attribute__((always_inline)) void int4_decode_chunk(
    __m512i wq, const float* s, const uint8_t* z, int64_t c, int64_t ngroups, __m512i& w0, __m512i& w1, __m512i& w2,
    __m512i& w3, __m512& sv) {
  const __m512i nib = _mm512_set1_epi16(0x000F);
  // Group-within-chunk bits of each 16-bit word lane i (k = 4i..4i+3): i*4/G, placed at bit 4 of the index.
  const __m512i gbits = _mm512_set_epi16(
      (31 * 4 / G) << 4, (30 * 4 / G) << 4, (29 * 4 / G) << 4, (28 * 4 / G) << 4, (27 * 4 / G) << 4,
      (26 * 4 / G) << 4, (25 * 4 / G) << 4, (24 * 4 / G) << 4, (23 * 4 / G) << 4, (22 * 4 / G) << 4,
      (21 * 4 / G) << 4, (20 * 4 / G) << 4, (19 * 4 / G) << 4, (18 * 4 / G) << 4, (17 * 4 / G) << 4,
      (16 * 4 / G) << 4, (15 * 4 / G) << 4, (14 * 4 / G) << 4, (13 * 4 / G) << 4, (12 * 4 / G) << 4,
      (11 * 4 / G) << 4, (10 * 4 / G) << 4, (9 * 4 / G) << 4, (8 * 4 / G) << 4, (7 * 4 / G) << 4, (6 * 4 / G) << 4,
      (5 * 4 / G) << 4, (4 * 4 / G) << 4, (3 * 4 / G) << 4, (2 * 4 / G) << 4, (1 * 4 / G) << 4, 0);
  __m512i i0 = _mm512_and_si512(wq, nib);
  __m512i i1 = _mm512_and_si512(_mm512_srli_epi16(wq, 4), nib);
  __m512i i2 = _mm512_and_si512(_mm512_srli_epi16(wq, 8), nib);
  __m512i i3 = _mm512_srli_epi16(wq, 12);
  if constexpr (G == 128) {
    const __m512i tab = _mm512_zextsi256_si512(table16(z[c]));  // indices are < 16: the upper half is unused
    w0 = _mm512_permutexvar_epi16(i0, tab);
    w1 = _mm512_permutexvar_epi16(i1, tab);
    w2 = _mm512_permutexvar_epi16(i2, tab);
    w3 = _mm512_permutexvar_epi16(i3, tab);
  } else if constexpr (G == 64) {
    const int64_t g0 = 2 * c, g1 = std::min<int64_t>(g0 + 1, ngroups - 1);
    const __m512i tab = _mm512_inserti64x4(_mm512_zextsi256_si512(table16(z[g0])), table16(z[g1]), 1);
    w0 = _mm512_permutexvar_epi16(_mm512_or_si512(i0, gbits), tab);
    w1 = _mm512_permutexvar_epi16(_mm512_or_si512(i1, gbits), tab);
    w2 = _mm512_permutexvar_epi16(_mm512_or_si512(i2, gbits), tab);
    w3 = _mm512_permutexvar_epi16(_mm512_or_si512(i3, gbits), tab);
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
  }
  sv = chunk_scales<G>(s, c, ngroups);
}

// GEMV offset decode (bf16 / fp16 x): one 128-k chunk of a packed int4 row -> four vectors of bf16(128 + q) in the
// "unpack" order (x permuted to match once per call, see kUnpackPos). lo / hi = the low / high nibble of every byte;
// interleaving them bytewise with 0x43 (vpunpck{l,h}bw, within 128-bit lanes) makes 16-bit lanes 0x43qq =
// bf16(128 + q) directly: 1 shift + 2 ands + 4 unpacks per 128 weights instead of 3 shifts + 4 logic ops, and the
// shifts and unpacks do not compete with vdpbf16ps for the FMA pipes. Measured (one thread, Zen 4, 512 KiB of
// weights in L2, the GEMV's inner loop): 25.2 -> 29.8 GB/s. 128-bit lane L holds bytes 16L..16L+15 =
// k 32L..32L+31, so word 8L + t of
//   w0 = unpacklo(lo): k = 32L + 2t        w1 = unpackhi(lo): k = 32L + 16 + 2t
//   w2 = unpacklo(hi): k = 32L + 2t + 1    w3 = unpackhi(hi): k = 32L + 16 + 2t + 1
// fp32 lane j of vdpbf16ps sums words 2j, 2j+1: k in [32 (j/4), 32 (j/4) + 32), the same groups per lane as
// int4_decode_chunk (G = 32: j/4, G = 64: j/8), so the scale vector is built the same way.
NVLM_AVX512BF16 inline int64_t unpack_pos_k(int64_t p) {  // k (within the chunk) at position p of the unpack order
  const int64_t r = p / 32, L = (p % 32) / 8, t = p % 8;
  return 32 * L + 16 * (r & 1) + 2 * t + (r >> 1);
}

template <int G>
NVLM_AVX512BF16 inline __attribute__((always_inline)) void int4_decode_chunk_unpack(
    __m512i wq, const float* s, int64_t c, int64_t ngroups, __m512i& w0, __m512i& w1, __m512i& w2, __m512i& w3,
    __m512& sv) {
  const __m512i nib8 = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  const __m512i lo = _mm512_and_si512(wq, nib8);                         // byte j: q[2j]
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wq, 4), nib8);   // byte j: q[2j + 1]
  w0 = _mm512_unpacklo_epi8(lo, c43);
  w1 = _mm512_unpackhi_epi8(lo, c43);
  w2 = _mm512_unpacklo_epi8(hi, c43);
  w3 = _mm512_unpackhi_epi8(hi, c43);
  sv = chunk_scales<G>(s, c, ngroups);
}

// ---- int4 GEMV: one output row n, MB rows of x, P bf16 parts of x -------------------------------------------------
// row: packed weights of n; s/z: its scales (fp32) and zeros; x: [MB][P][kpad] (chunk-permuted: the unpack order
// if OFF, else the order of quant_kernels.h). Adds the
// contribution of chunks [c0, c1) to acc[m] (MB vectors of 16 fp32 partial sums, summed by the caller).
template <int G, int MB, int P, bool OFF>
NVLM_AVX512BF16 void int4_row(const uint8_t* row, const float* s, const uint8_t* z, int64_t K, const uint16_t* x,
                              int64_t kpad, int64_t c0, int64_t c1, float* acc_io) {
  const int64_t ngroups = K / G;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_loadu_ps(acc_io + 16 * m);

  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * kChunk;
    const uint8_t* p = row + k0 / 2;
    // K is a multiple of G >= 32, so a partial last chunk holds whole groups; masked-off bytes read as q = 0 and
    // meet zero-padded x.
    _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
    const __m512i wq = (k0 + kChunk <= K) ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(byte_mask((K - k0) / 2), p);
    __m512i w0, w1, w2, w3;
    __m512 sv;
    if constexpr (OFF) int4_decode_chunk_unpack<G>(wq, s, c, ngroups, w0, w1, w2, w3, sv);
    else int4_decode_chunk<G>(wq, s, z, c, ngroups, w0, w1, w2, w3, sv);
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

template <int G, int P, bool OFF>
Int4Fn int4_fn_mb(int mb) {
  switch (mb) {
    case 1: return &int4_row<G, 1, P, OFF>;
    case 2: return &int4_row<G, 2, P, OFF>;
    case 3: return &int4_row<G, 3, P, OFF>;
    case 4: return &int4_row<G, 4, P, OFF>;
    case 5: return &int4_row<G, 5, P, OFF>;
    case 6: return &int4_row<G, 6, P, OFF>;
    case 7: return &int4_row<G, 7, P, OFF>;
    default: return &int4_row<G, 8, P, OFF>;
  }
}

// bf16 / fp16 activations (1 / 2 parts): offset decode (bf16(128 + q), zero point corrected per group at the end);
// fp32 activations (3 parts): the exact centred table, so fp32 inputs keep fp32-level error (see header comment).
template <int G>
Int4Fn int4_fn_p(int parts, int mb) {
  return parts == 1 ? int4_fn_mb<G, 1, true>(mb) : parts == 2 ? int4_fn_mb<G, 2, true>(mb)
                                                              : int4_fn_mb<G, 3, false>(mb);
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

// Zero-point term of the offset decode for one weight row: cz[g] = s[g] * (128 + z[g]).
NVLM_AVX512BF16 void offset_terms(const float* s, const uint8_t* z, int64_t ngroups, float* cz) {
  int64_t g = 0;
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (; g + 16 <= ngroups; g += 16) {
    const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + g))));
    _mm512_storeu_ps(cz + g, _mm512_mul_ps(_mm512_loadu_ps(s + g), _mm512_add_ps(zf, c128)));
  }
  for (; g < ngroups; ++g) cz[g] = s[g] * (128.f + static_cast<float>(z[g] & 15));
}

// fp64 versions for the offset decode's final subtraction (once per output, not in the inner loop).
NVLM_AVX512BF16 double dot_f64(const float* a, const float* b, int64_t n) {
  __m512d acc = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i)), acc);
  double t = _mm512_reduce_add_pd(acc);
  for (; i < n; ++i) t += static_cast<double>(a[i]) * b[i];
  return t;
}

NVLM_AVX512BF16 inline double sum_f64(__m512 v) {
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                                            _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1))));
}

constexpr int kMaxMB = 8;   // x rows sharing one decode of the weights
constexpr int64_t kTileN = 16;  // output rows per k-blocked tile

}  // namespace

// Loop nest per thread: tiles of kTileN output rows (static split over threads) -> blocks of <= 8 x rows ->
// k-blocks -> rows of the tile -> 128-wide chunks. A k-block of the x block (<= 16 KiB of bf16 parts) stays in L1
// while every row of the tile uses it; the tile's packed weights (<= 16 x 4 KiB at K = 8192) stay in L2 across the
// x blocks, so DRAM sees each weight byte once. For M = 1 the whole of x fits in L1 and there is one k-block.
NVLM_AVX512BF16 void gemv_avx512bf16(const QWeight& w, const uint16_t* xparts, int parts, int64_t kpad,
                                     const float* xgsum, const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M;
  const int64_t ngroups = w.bits == 4 ? K / w.group : 1;
  const int64_t nblocks = (M + kMaxMB - 1) / kMaxMB;
  const int64_t nchunks = (K + kChunk - 1) / kChunk;  // kpad is the row stride (>= K rounded up to kChunk)
  const int last_mb = static_cast<int>(M - (nblocks - 1) * kMaxMB);
  const int full_mb = nblocks > 1 ? kMaxMB : last_mb;
  // k-block: as many chunks as keep one x block (mb rows x parts x 2 bytes) within 16 KiB. (Smaller k-blocks for
  // M = 1 split each weight row into pieces and defeat the sequential stream + prefetch: measured 1.7x slower.)
  const int64_t kb_chunks = std::max<int64_t>(1, (16 << 10) / (int64_t(full_mb) * parts * 2 * kChunk));
  // int4 offset decode: the kernel's weights come out in the unpack order (int4_decode_chunk_unpack), so x (given
  // in the order of quant_kernels.h: position 32r + i of a chunk holds k = 4i + r) is re-permuted once per call;
  // M * parts * K values, shared by all N rows (K = 8192: a few microseconds against milliseconds of weights).
  std::vector<uint16_t> xunpack;
  if (w.bits == 4 && parts <= 2) {
    int64_t src[kChunk];  // position p of the unpack order <- position src[p] of the caller's order
    for (int64_t p = 0; p < kChunk; ++p) {
      const int64_t k = unpack_pos_k(p);
      src[p] = 32 * (k % 4) + k / 4;
    }
    const int64_t xrows = M * parts;
    xunpack.assign(static_cast<size_t>(xrows * kpad), 0);  // beyond the last chunk: zero, like the caller's padding
    for (int64_t r = 0; r < xrows; ++r)
      for (int64_t c = 0; c < nchunks; ++c) {
        const uint16_t* from = xparts + r * kpad + c * kChunk;
        uint16_t* to = xunpack.data() + r * kpad + c * kChunk;
        for (int64_t p = 0; p < kChunk; ++p) to[p] = from[src[p]];
      }
    xparts = xunpack.data();
  }
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
    std::vector<float> srow(kTileN * ngroups), cz(ngroups);
    const bool offset = w.bits == 4 && parts <= 2;  // the int4 kernels chosen above decode bf16(128 + q)
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
          if (offset) offset_terms(&srow[i * ngroups], w.zeros + n * ngroups, ngroups, cz.data());
          for (int m = 0; m < mb; ++m) {
            // offset decode: sum_k x (q - z) s = sum_g s_g (sum_{k in g} x (128 + q) - (128 + z_g) sum_{k in g} x)
            // The two sums are ~143x larger than their difference: add the 16 lanes and subtract in fp64 so that
            // only the lanes' own fp32 roundings remain (in fp32 the final rounding of each sum alone could be
            // a whole fp16 output ulp).
            if (offset) {
              const double corr = dot_f64(cz.data(), xgsum + (m0 + m) * ngroups, ngroups);
              out.y[(m0 + m) * N + n] = static_cast<float>(sum_f64(_mm512_load_ps(acc[i] + 16 * m)) - corr) + b;
            } else {
              out.y[(m0 + m) * N + n] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 16 * m)) * s8 + b;
            }
          }
        }
      }
    }
  }
}

// ---- Tiled kernels for a few to a few dozen x rows (kTileMinMCpu <= M <= kGemvMaxMCpu; int4 to kTileMaxMInt4Cpu) --
// The GEMV above decodes the weights in registers and streams x from L1 for every weight vector: one x load per
// vdpbf16ps, the decode repeated for every block of 8 x rows, and a scale FMA per row and chunk. When M is large
// enough to be compute-bound, these paths instead decode a block of weights ONCE into an L1 buffer of exact bf16
// values and multiply it with every x row by a register-blocked micro-kernel, so each decoded vector feeds many
// vdpbf16ps. fp16 / fp32 x are split into 2 / 3 bf16 parts handled as extra x rows (2x / 3x the multiply work) and
// summed at the end.
//
// int8 ("k in lanes"): a tile of kBN weight rows x kBK columns is decoded in natural k order; a micro-tile of
// kMR x rows x kNR8 weight rows holds 16-lane fp32 accumulators whose lanes are k pairs (reduced horizontally at
// the end); the per-channel scale multiplies the final sum. One thread, K = N = 8192, M = 16 (CPU time): 18.5 ms
// (GEMV 31.4, bf16 dense 19.3); without the decode it would take 13.1 (= vdpbf16ps peak): the int8 -> bf16
// conversion (2x vpmovsxbd, 2x vcvtdq2ps, vcvtne2ps2bf16 per 32 weights) is its remaining overhead.
//
// int4 ("weight rows in lanes", tiled_int4 below): the group scale rules out the int8 layout. With k pairs in the
// lanes, a lane sums only 8 k of a 128-k group, so every group's scale costs one FMA per 4 vdpbf16ps per
// accumulator, and the two sets of accumulators (per group, running) leave registers for only a 4 x 2 micro-tile.
// So the int4 tile puts 16 weight ROWS in the 16 fp32 lanes: a decoded vector holds one pair of k of 16 rows, x
// contributes the same pair as a 32-bit broadcast, and each accumulator sums a whole group for 16 outputs before one
// FMA applies the 16 rows' scales. A 16 x 16 dword transpose of 16 rows' 64-byte chunks lines up 8 k of 16 rows per
// vector; each pair of k then takes 2 ops (shift, ternary logic) to decode. One thread, K = N = 8192, bf16 x, median
// of 7 (same run): M = 16 14.6 ms against 20.0 for the k-in-lanes layout it replaced and 18.0 for bf16 dense;
// M = 8 9.1 vs 12.0-13.0; M = 32 25.5 vs 37-43. Split by disabling one part (results then invalid): the
// micro-kernels alone 12.2-13.0 ms (~80% of the 2048^3 bf16 matmul's rate), the chunk loads + transpose + decode
// alone 4.6-5.6 ms, mostly hidden under the micro-kernels. Tried and not kept: vdpbf16ps with the broadcast as an
// embedded {1to16} operand (GCC does not fold it; inline asm: ~5%, within the noise), software prefetch of the
// rows' next chunks (no gain).
namespace {

constexpr int64_t kBN = 16;   // int8: weight rows per tile (decoded once per k block, shared by all x rows)
constexpr int64_t kBK = 256;  // int8: k per block: 8 KiB of decoded weights + (rows x 512 B) of x stay in L1
constexpr int kMR = 4;        // int8: x rows per micro-tile (x rows are padded to a multiple of kMR with zeros)
constexpr int kNR8 = 4;       // int8: weight rows per micro-tile: 16 accumulators + 4 weight vectors

// int8 rows [n0, n0 + kBN) x columns [k0, k1) of the weight -> wb[kBN][kBK] bf16 bits: exact q, natural k order,
// columns >= K and rows >= N read as 0; (k1 - k0) % 32 == 0.
NVLM_AVX512BF16 void decode_tile_int8(const QWeight& w, int64_t n0, int64_t k0, int64_t k1, uint16_t* wb) {
  const int64_t K = w.K;
  for (int64_t i = 0; i < kBN; ++i) {
    const int64_t n = n0 + i;
    uint16_t* d = wb + i * kBK - k0;  // d[k] for k in [k0, k1)
    if (n >= w.N) {
      std::fill(d + k0, d + k1, uint16_t(0));
      continue;
    }
    const int8_t* row = static_cast<const int8_t*>(w.qweight) + n * K;
    for (int64_t k = k0; k < k1; k += 32) {
      const __m256i b = (k + 32 <= K) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k))
                                      : _mm256_maskz_loadu_epi8((__mmask32)byte_mask(K - k), row + k);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      _mm512_store_si512(d + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // exact: |q| <= 128
    }
  }
}

// int8 micro-kernel: tot[r][i] += sum_{k < nk} x[r][k] * wb[i][k] for r < kMR, i < NR.
// x: kMR rows of stride xstride; wb: NR rows of stride kBK; tot: [kMR][kBN][16] (row stride kBN * 16).
template <int NR>
NVLM_AVX512BF16 void micro_int8(const uint16_t* x, int64_t xstride, const uint16_t* wb, int64_t nk, float* tot) {
  __m512 acc[kMR][NR];
  for (int r = 0; r < kMR; ++r)
    for (int i = 0; i < NR; ++i) acc[r][i] = _mm512_loadu_ps(tot + (r * kBN + i) * 16);
  for (int64_t k = 0; k < nk; k += 32) {
    __m512i wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_load_si512(wb + i * kBK + k);
    for (int r = 0; r < kMR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * xstride + k);
      for (int i = 0; i < NR; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)wv[i], xv);
    }
  }
  for (int r = 0; r < kMR; ++r)
    for (int i = 0; i < NR; ++i) _mm512_storeu_ps(tot + (r * kBN + i) * 16, acc[r][i]);
}

NVLM_AVX512BF16 void tiled_int8(const QWeight& w, const uint16_t* xrows, int64_t rows, int parts, int64_t kpad,
                                const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M;
  const int64_t kr = (K + 31) / 32 * 32;  // whole 32-column steps (x is zero beyond K)
  const int64_t ntiles = (N + kBN - 1) / kBN;
#pragma omp parallel num_threads(out.threads)
  {
    alignas(64) uint16_t wb[kBN * kBK];
    std::vector<float> tot(rows * kBN * 16), srow(kBN, 0.f);
    // Dynamic: on a shared machine a descheduled thread must not hold back the whole call (see the GEMV).
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t n0 = t * kBN, nt = std::min(kBN, N - n0);
      scales_to_f32(w.scales, w.stype, n0, nt, srow.data());
      std::fill(tot.begin(), tot.end(), 0.f);
      for (int64_t k0 = 0; k0 < kr; k0 += kBK) {
        const int64_t k1 = std::min(kr, k0 + kBK);
        decode_tile_int8(w, n0, k0, k1, wb);
        for (int64_t rb = 0; rb < rows; rb += kMR)
          for (int64_t nb = 0; nb < kBN; nb += kNR8)
            micro_int8<kNR8>(xrows + rb * kpad + k0, kpad, wb + nb * kBK, k1 - k0, &tot[(rb * kBN + nb) * 16]);
      }
      for (int64_t i = 0; i < nt; ++i) {
        const float b = out.bias ? out.bias[n0 + i] : 0.f;
        for (int64_t m = 0; m < M; ++m) {
          float v = 0.f;
          for (int p = 0; p < parts; ++p)
            v += _mm512_reduce_add_ps(_mm512_loadu_ps(&tot[((m * parts + p) * kBN + i) * 16]));
          out.y[m * N + n0 + i] = v * srow[i] + b;
        }
      }
    }
  }
}

// ---- int4: weight rows in lanes ----------------------------------------------------------------------------------
constexpr int kLanes = 16;    // weight rows per int4 tile: one per fp32 lane
constexpr int kMaxMR4 = 16;   // x rows per int4 micro-kernel call (one accumulator each)
constexpr int64_t kPairsPerChunk = kChunk / 2;

// r[i] = dwords 0..15 of weight row i  ->  r[d] = dword d of rows 0..15 (lane i: row i). Three shuffle stages of the
// usual 16 x 16 transpose: 32-bit and 64-bit interleaves within 128-bit lanes, then 128-bit lanes across registers.
NVLM_AVX512BF16 inline __attribute__((always_inline)) void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // 128-bit lane L of t[i] / t[i+1]: dwords 4L, 4L+1 / 4L+2, 4L+3 of rows i, i+1
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int b = 0; b < 16; b += 4) {  // 128-bit lane L of u[b + e]: dword 4L + e of rows b..b+3
    u[b + 0] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
    u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
    u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // gather 128-bit lane L of u[e], u[4+e], u[8+e], u[12+e] into r[4L + e]
    const __m512i ab_lo = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);       // lanes A0 A1 B0 B1
    const __m512i ab_hi = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);       // A2 A3 B2 B3
    const __m512i cd_lo = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);  // C0 C1 D0 D1
    const __m512i cd_hi = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);  // C2 C3 D2 D3
    r[e] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);                        // A0 B0 C0 D0
    r[4 + e] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);                    // A1 B1 C1 D1
    r[8 + e] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
}

// One 128-k chunk (k0 = 128 c) of the tile's 16 weight rows -> wv[64][32] bf16 bits: vector p = 4d + j, dword lane
// i = (k0 + 8d + j, k0 + 8d + j + 4) of row i, as bf16(128 + q) (OFF: the offset code) or the exact bf16(q - z)
// (zoff[g]: 16 - z of each lane's row in both words; table: bf16(j - 16)). rows[i]: the packed row of tile row i
// (nullptr: zeros).
template <bool OFF>
NVLM_AVX512BF16 void decode_chunk_lanes(const uint8_t* const* rows, int64_t K, int64_t k0, int64_t group,
                                        const uint32_t* zoff, uint16_t* wv) {
  __m512i r[kLanes];
  const __mmask64 tail = byte_mask((K - k0) / 2);  // bytes past K read as q = 0; never multiplied (see tiled_int4)
  for (int i = 0; i < kLanes; ++i)
    r[i] = rows[i] == nullptr ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi8(tail, rows[i] + k0 / 2);
  transpose_16x16_epi32(r);  // r[d], lane i: bytes 4d..4d+3 of row i = k0 + 8d .. k0 + 8d + 7
  // Nibble j of a 32-bit word is k = 8d + j (low nibble = even k), so the word's nibbles j and j + 4 sit at bits 4j
  // and 4j + 16: one shift and one ternary-logic op put them in the two 16-bit halves as bf16(128 + q) = 0x4300 | q.
  // Vector 4d + j thus pairs k = 8d + j (low word) with k = 8d + j + 4 (high word); x is laid out to match.
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  [[maybe_unused]] const __m512i table = _mm512_loadu_si512(kCenteredTable32.v);
  for (int d = 0; d < 16; ++d) {
    [[maybe_unused]] const __m512i zo = OFF ? nibbles : _mm512_loadu_si512(zoff + (k0 + 8 * d) / group * kLanes);
    for (int j = 0; j < 4; ++j) {
      const __m512i q = _mm512_srli_epi32(r[d], 4 * j);
      __m512i v;
      if constexpr (OFF)
        v = _mm512_ternarylogic_epi32(q, nibbles, _mm512_set1_epi32(0x43004300), 0xEA);  // (a & b) | c
      else
        v = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_and_si512(q, nibbles), zo), table);
      _mm512_store_si512(wv + (4 * d + j) * 32, v);
    }
  }
}

// tot[r] += s * sum_{p < npairs} x[r] (pair p) * wv[p] for r < MR, one group (16 output rows in the lanes); OFF: also
// tot[r] -= cz * xgs[r * xgs_stride] (the offset decode's zero-point term: cz = s (128 + z), xgs = the row's group
// sum of x, 0 for the extra parts of fp16 x). xp[p][r]: row r's bf16 pair of x for vector p of the group (pairing as
// in decode_chunk_lanes), kMaxMR4 rows per pair: one base pointer, so the broadcasts load from fixed offsets (with a
// pointer per row GCC ran out of registers and spilled in the inner loop).
template <int MR, bool OFF>
NVLM_AVX512BF16 void micro_int4_lanes(const uint32_t* xp, const uint16_t* wv, int64_t npairs, __m512 s, __m512 cz,
                                      const float* xgs, int64_t xgs_stride, float* tot) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    const __m512bh wp = (__m512bh)_mm512_load_si512(wv + 32 * p);
    const uint32_t* xr = xp + kMaxMR4 * p;
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wp, (__m512bh)_mm512_set1_epi32(xr[r]));
  }
  for (int r = 0; r < MR; ++r) {
    __m512 t = _mm512_fmadd_ps(acc[r], s, _mm512_loadu_ps(tot + 16 * r));
    if constexpr (OFF) t = _mm512_fnmadd_ps(cz, _mm512_set1_ps(xgs[r * xgs_stride]), t);
    _mm512_storeu_ps(tot + 16 * r, t);
  }
}

using MicroInt4 = void (*)(const uint32_t*, const uint16_t*, int64_t, __m512, __m512, const float*, int64_t, float*);

template <bool OFF>
MicroInt4 micro_int4_for(int64_t mr) {  // rows come in multiples of 4 (quant_kernels.h)
  return mr >= 16 ? &micro_int4_lanes<16, OFF> : mr == 12 ? &micro_int4_lanes<12, OFF>
                                              : mr == 8 ? &micro_int4_lanes<8, OFF> : &micro_int4_lanes<4, OFF>;
}

// Loop nest per thread: tiles of 16 weight rows (dynamic over threads) -> 128-k chunks (transpose + decode into
// wv, 4 KiB) -> blocks of <= 16 x rows -> the chunk's groups. tot[rows][16] holds the running sums of the tile.
template <bool OFF>
NVLM_AVX512BF16 void tiled_int4(const QWeight& w, const uint16_t* xrows, int64_t rows, int parts, int64_t kpad,
                                const float* xgsum, const Out& out) {
  const int64_t N = w.N, K = w.K, M = out.M, G = w.group, ngroups = K / G;
  const int64_t ntiles = (N + kLanes - 1) / kLanes;
  // The zero-point term's group sums per x row: row m * parts (part 0) carries x row m's sum, other rows 0.
  std::vector<float> xgs(OFF ? rows * ngroups : 0, 0.f);
  if constexpr (OFF)
    for (int64_t m = 0; m < M; ++m) std::copy_n(xgsum + m * ngroups, ngroups, &xgs[m * parts * ngroups]);
  const int64_t full_blocks = rows / kMaxMR4, last_mr = rows % kMaxMR4;
  // x as bf16 pairs in the decode's k pairing, pair-major within blocks of kMaxMR4 rows: xp[blk][4d + j][r] =
  // (x[r'][8d + j], x[r'][8d + j + 4]), r' = blk * kMaxMR4 + r (rows past `rows`: zero). Once per call (M * K values).
  const int64_t npairs = K / 2, nblocks = (rows + kMaxMR4 - 1) / kMaxMR4;
  std::vector<uint32_t> xp(nblocks * npairs * kMaxMR4, 0u);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* src = xrows + r * kpad;
    uint32_t* dst = &xp[(r / kMaxMR4) * npairs * kMaxMR4 + r % kMaxMR4];
    for (int64_t p = 0; p < npairs; ++p) {
      const int64_t k = 8 * (p / 4) + p % 4;
      dst[p * kMaxMR4] = uint32_t(src[k]) | uint32_t(src[k + 4]) << 16;
    }
  }
  const MicroInt4 micro_full = micro_int4_for<OFF>(kMaxMR4), micro_last = micro_int4_for<OFF>(last_mr);
#pragma omp parallel num_threads(out.threads)
  {
    alignas(64) uint16_t wv[kPairsPerChunk * 32];
    // Per group g, lane i = tile row i: its scale, s (128 + z), and 16 - z in both words (exact decode).
    std::vector<float> s_t(ngroups * kLanes), cz_t(ngroups * kLanes), tot(rows * kLanes), srow(kLanes * ngroups);
    std::vector<uint32_t> zoff_t(ngroups * kLanes);
    const uint8_t* row_ptr[kLanes];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t n0 = t * kLanes, nt = std::min<int64_t>(kLanes, N - n0);
      scales_to_f32(w.scales, w.stype, n0 * ngroups, nt * ngroups, srow.data());
      for (int64_t g = 0; g < ngroups; ++g)
        for (int i = 0; i < kLanes; ++i) {
          const int z = i < nt ? w.zeros[(n0 + i) * ngroups + g] & 15 : 0;
          const float s = i < nt ? srow[i * ngroups + g] : 0.f;  // rows past N: scale 0, so their sums stay 0
          s_t[g * kLanes + i] = s;
          cz_t[g * kLanes + i] = s * (128.f + z);
          zoff_t[g * kLanes + i] = uint32_t(16 - z) * 0x00010001u;
        }
      for (int i = 0; i < kLanes; ++i)
        row_ptr[i] = i < nt ? static_cast<const uint8_t*>(w.qweight) + (n0 + i) * (K / 2) : nullptr;
      std::fill(tot.begin(), tot.end(), 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        decode_chunk_lanes<OFF>(row_ptr, K, k0, G, zoff_t.data(), wv);
        const int64_t g0 = k0 / G, g1 = std::min(ngroups, (k0 + kChunk) / G);  // the chunk's groups (K % G == 0)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
          const int64_t r0 = blk * kMaxMR4;
          const MicroInt4 micro = blk < full_blocks ? micro_full : micro_last;
          for (int64_t g = g0; g < g1; ++g)
            micro(&xp[(blk * npairs + g * G / 2) * kMaxMR4], wv + (g * G - k0) / 2 * 32, G / 2,
                  _mm512_loadu_ps(&s_t[g * kLanes]), _mm512_loadu_ps(&cz_t[g * kLanes]),
                  OFF ? &xgs[r0 * ngroups + g] : nullptr, ngroups, &tot[r0 * kLanes]);
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < nt; ++i) {
          float v = out.bias ? out.bias[n0 + i] : 0.f;
          for (int p = 0; p < parts; ++p) v += tot[(m * parts + p) * kLanes + i];
          out.y[m * N + n0 + i] = v;
        }
    }
  }
}

}  // namespace

NVLM_AVX512BF16 void tiled_avx512bf16(const QWeight& w, const uint16_t* xrows, int64_t rows, int parts, int64_t kpad,
                                      const float* xgsum, const Out& out) {
  if (w.bits == 8) tiled_int8(w, xrows, rows, parts, kpad, out);
  else if (parts <= 2) tiled_int4<true>(w, xrows, rows, parts, kpad, xgsum, out);  // same choice as the GEMV
  else tiled_int4<false>(w, xrows, rows, parts, kpad, xgsum, out);
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
