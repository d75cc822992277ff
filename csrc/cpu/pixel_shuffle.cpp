// CPU kernels for nvlm_kernels::pixel_shuffle and nvlm_kernels::pixel_shuffle_layernorm (schemas in csrc/ops.cpp,
// maths in nvlm_kernels/pixel_shuffle.py, index maths in csrc/common/pixel_shuffle.h).
//
// x [T, N, C] -> out [T, N/4, 4C]. Each output row is four C-wide source rows placed side by side, so
//   * pixel_shuffle is four contiguous block copies per output row;
//   * pixel_shuffle_layernorm reads the four source blocks of a row (4C = 12800 values, 25-51 KB: they stay in
//     L1/L2 after the first pass), computes the fp32 mean, then the fp32 variance around it (two passes over cached
//     data, as accurate as PyTorch's LayerNorm even when |mean| >> std), then writes the normalised row once.
// Every byte of x is read from memory once and every byte of out written once. Outputs larger than the last-level
// cache are written with non-temporal (streaming) stores: they bypass the cache and skip the read-for-ownership a
// normal store does, so the traffic is read + write instead of read + read + write (glibc's memcpy does the same for
// large copies). Large outputs also get transparent huge pages before the first write (advise_huge_pages): faulting
// a fresh 46 MB output in 4 KB pages cost more than the kernel itself.
//
// Three versions chosen at run time by nvlm::cpu_capability() (NVLM_KERNELS_CPU_ISA caps it): AVX-512, AVX2 and
// scalar. bf16 <-> fp32 is done with integer shifts (round-to-nearest-even on the way back, NaN kept quiet), fp16
// with F16C. Rows are split across OpenMP threads in chunks.
#include <ATen/ATen.h>
#if defined(__x86_64__) || defined(_M_X64)
#define NVLM_PS_X86 1
#include <immintrin.h>
#endif
#include <omp.h>
#include <torch/library.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/pixel_shuffle.h"

namespace {

using nvlm::pixel_shuffle::Geometry;
using nvlm::pixel_shuffle::source_offset;

// Outputs larger than the last-level cache (as the OS reports it) are written with streaming stores: they cannot
// stay cached anyway. Smaller ones are left in the cache for the next op (the projector GEMM) to read back.
// Outputs of at least kHugePageMinBytes get transparent huge pages (see advise_huge_pages).
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long l3 = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) : int64_t{32} << 20;  // unknown: assume a typical server L3
  }();
  return bytes;
}

// Rows are handed to OpenMP threads in chunks of this many (dynamic schedule): on a shared machine one preempted
// thread would otherwise hold every other thread at the end-of-loop barrier with half the rows still to do. 16 rows
// of 12800 values are 0.4-0.8 MB of work, so the scheduling cost is negligible.
constexpr int kRowsPerChunk = 16;

// The four source rows (C values each) that make output row `row`, in channel-block order.
template <typename T>
inline void source_rows(const T* x, int64_t row, const Geometry& g, const T* src[4]) {
  for (int b = 0; b < 4; ++b) src[b] = x + source_offset(row, b, g.side, g.channels, g.version);
}

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }  // exact (bits << 16)
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10: round to nearest even, NaN stays NaN

// ------------------------------------------------------------------------------------------------------------
// Scalar version (any x86-64 / any CPU). Plain loops; the compiler may still vectorise them with SSE2.
// ------------------------------------------------------------------------------------------------------------
namespace scalar {

template <typename T>
void layernorm_row(const T* const src[4], int64_t C, const float* w, const float* b, float eps, T* dst) {
  // One serial accumulator (no SIMD lanes splitting the sum): in fp32 it would lose ~1e-4 relative over 12800
  // values, so this fallback accumulates in double.
  double sum = 0.0;
  for (int blk = 0; blk < 4; ++blk)
    for (int64_t k = 0; k < C; ++k) sum += to_float(src[blk][k]);
  const auto mean = static_cast<float>(sum / static_cast<double>(4 * C));
  double sq = 0.0;
  for (int blk = 0; blk < 4; ++blk)
    for (int64_t k = 0; k < C; ++k) {
      const double d = to_float(src[blk][k]) - mean;
      sq += d * d;
    }
  const auto rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(4 * C) + eps));
  for (int blk = 0; blk < 4; ++blk)
    for (int64_t k = 0; k < C; ++k) {
      const int64_t c = blk * C + k;
      dst[c] = from_float<T>((to_float(src[blk][k]) - mean) * rstd * w[c] + b[c]);
    }
}

template <typename T>
void layernorm_rows(const T* x, const float* w, const float* b, float eps, T* out, Geometry g) {
#pragma omp parallel for schedule(dynamic, kRowsPerChunk)
  for (int64_t r = 0; r < g.rows; ++r) {
    const T* src[4];
    source_rows(x, r, g, src);
    layernorm_row(src, g.channels, w, b, eps, out + r * 4 * g.channels);
  }
}

void shuffle_rows(const char* x, char* out, Geometry g, int64_t elem_bytes) {
  const int64_t block = g.channels * elem_bytes;
#pragma omp parallel for schedule(dynamic, kRowsPerChunk)
  for (int64_t r = 0; r < g.rows; ++r)
    for (int b = 0; b < 4; ++b)
      std::memcpy(out + (r * 4 + b) * block, x + source_offset(r, b, g.side, g.channels, g.version) * elem_bytes,
                  block);
}

}  // namespace scalar

#if defined(NVLM_PS_X86)  // the SIMD versions exist on x86-64 only; elsewhere cpu_capability() is scalar
// ------------------------------------------------------------------------------------------------------------
// AVX-512 version. The pragma gives every function in this region (and the OpenMP bodies outlined from them) the
// target, so the intrinsics inline; nothing here runs unless cpu_capability() said AVX-512.
// ------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
// GCC 12's intrinsic headers trip -Wmaybe-uninitialized on their own `__m512i __Y = __Y;` placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

constexpr int kLanes = 16;  // fp32 values per vector

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

// fp32 -> bf16 rounding to nearest even, as c10::BFloat16 does: add 0x7FFF + (bit 16), keep the high half. A NaN
// becomes the quiet NaN 0x7FC0 (adding could carry its payload into the exponent and make it an infinity).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// kStream: non-temporal store (the address must then be aligned to the store width: 64 B fp32, 32 B fp16/bf16).
template <bool kStream>
inline void store(float* p, __m512 v) {
  if constexpr (kStream) _mm512_stream_ps(p, v);
  else _mm512_storeu_ps(p, v);
}
template <bool kStream>
inline void store16(void* p, __m256i h) {
  if constexpr (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
template <bool kStream>
inline void store(at::Half* p, __m512 v) {
  store16<kStream>(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <bool kStream>
inline void store(at::BFloat16* p, __m512 v) { store16<kStream>(p, to_bf16(v)); }

// Sum over the 4 blocks of f(x) where f(x) = x (kSquares false) or (x - mean)^2 (kSquares true). Four independent
// accumulators keep the adds throughput- rather than latency-bound.
template <bool kSquares, typename T>
inline float row_sum(const T* const src[4], int64_t C, float mean) {
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  float tail = 0.f;
  auto term = [&](__m512 v, __m512 a) {
    if constexpr (kSquares) {
      const __m512 d = _mm512_sub_ps(v, vm);
      return _mm512_fmadd_ps(d, d, a);
    } else {
      return _mm512_add_ps(v, a);
    }
  };
  for (int blk = 0; blk < 4; ++blk) {
    const T* p = src[blk];
    int64_t k = 0;
    for (; k + 4 * kLanes <= C; k += 4 * kLanes)
      for (int u = 0; u < 4; ++u) acc[u] = term(load(p + k + u * kLanes), acc[u]);
    for (; k + kLanes <= C; k += kLanes) acc[0] = term(load(p + k), acc[0]);
    for (; k < C; ++k) {
      const float d = to_float(p[k]) - (kSquares ? mean : 0.f);
      tail += kSquares ? d * d : d;
    }
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  return _mm512_reduce_add_ps(s) + tail;
}

template <bool kStream, typename T>
inline void normalise_block(const T* p, int64_t C, float mean, float rstd, const float* w, const float* b, T* dst) {
  const __m512 vm = _mm512_set1_ps(mean), vr = _mm512_set1_ps(rstd);
  int64_t k = 0;
  for (; k + kLanes <= C; k += kLanes) {
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(load(p + k), vm), vr);
    store<kStream>(dst + k, _mm512_fmadd_ps(y, _mm512_loadu_ps(w + k), _mm512_loadu_ps(b + k)));
  }
  for (; k < C; ++k) dst[k] = from_float<T>((to_float(p[k]) - mean) * rstd * w[k] + b[k]);
}

template <typename T>
void layernorm_rows(const T* x, const float* w, const float* b, float eps, T* out, Geometry g, bool stream) {
  const int64_t C = g.channels;
  const float inv_width = 1.f / static_cast<float>(4 * C);
  // A block can be streamed only if each 16-lane store is aligned: its start aligned and C a multiple of 16.
  const int64_t store_bytes = kLanes * static_cast<int64_t>(sizeof(T));
  stream = stream && C % kLanes == 0 && reinterpret_cast<uintptr_t>(out) % store_bytes == 0;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, kRowsPerChunk)
    for (int64_t r = 0; r < g.rows; ++r) {
      const T* src[4];
      source_rows(x, r, g, src);
      const float mean = row_sum<false>(src, C, 0.f) * inv_width;
      const float rstd = 1.f / std::sqrt(row_sum<true>(src, C, mean) * inv_width + eps);
      T* dst = out + r * 4 * C;
      for (int blk = 0; blk < 4; ++blk) {
        if (stream)
          normalise_block<true>(src[blk], C, mean, rstd, w + blk * C, b + blk * C, dst + blk * C);
        else
          normalise_block<false>(src[blk], C, mean, rstd, w + blk * C, b + blk * C, dst + blk * C);
      }
    }
    if (stream) _mm_sfence();  // make this thread's streaming stores visible before the parallel region ends
  }
}

// memcpy with 64-byte non-temporal stores (after an unaligned head that brings dst to a 64-byte boundary).
inline void copy_stream(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64));
  std::memcpy(dst, src, head);
  int64_t k = head;
  for (; k + 256 <= n; k += 256)
    for (int u = 0; u < 4; ++u)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + k + 64 * u),
                          _mm512_loadu_si512(reinterpret_cast<const void*>(src + k + 64 * u)));
  for (; k + 64 <= n; k += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + k), _mm512_loadu_si512(reinterpret_cast<const void*>(src + k)));
  std::memcpy(dst + k, src + k, n - k);
}

void shuffle_rows(const char* x, char* out, Geometry g, int64_t elem_bytes, bool stream) {
  const int64_t block = g.channels * elem_bytes;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, kRowsPerChunk)
    for (int64_t r = 0; r < g.rows; ++r)
      for (int b = 0; b < 4; ++b) {
        const char* src = x + source_offset(r, b, g.side, g.channels, g.version) * elem_bytes;
        if (stream) copy_stream(out + (r * 4 + b) * block, src, block);
        else std::memcpy(out + (r * 4 + b) * block, src, block);
      }
    if (stream) _mm_sfence();
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------------------
// AVX2 version: the same structure with 8 fp32 lanes.
// ------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

constexpr int kLanes = 8;

inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (see the AVX-512 version).
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  r = _mm256_srli_epi32(r, 16);  // 8 x u32 < 65536: pack to u16 without saturation surprises
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <bool kStream>
inline void store(float* p, __m256 v) {
  if constexpr (kStream) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}
template <bool kStream>
inline void store8(void* p, __m128i h) {
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
template <bool kStream>
inline void store(at::Half* p, __m256 v) {
  store8<kStream>(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <bool kStream>
inline void store(at::BFloat16* p, __m256 v) { store8<kStream>(p, to_bf16(v)); }

inline float reduce(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool kSquares, typename T>
inline float row_sum(const T* const src[4], int64_t C, float mean) {
  const __m256 vm = _mm256_set1_ps(mean);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  float tail = 0.f;
  auto term = [&](__m256 v, __m256 a) {
    if constexpr (kSquares) {
      const __m256 d = _mm256_sub_ps(v, vm);
      return _mm256_fmadd_ps(d, d, a);
    } else {
      return _mm256_add_ps(v, a);
    }
  };
  for (int blk = 0; blk < 4; ++blk) {
    const T* p = src[blk];
    int64_t k = 0;
    for (; k + 4 * kLanes <= C; k += 4 * kLanes)
      for (int u = 0; u < 4; ++u) acc[u] = term(load(p + k + u * kLanes), acc[u]);
    for (; k + kLanes <= C; k += kLanes) acc[0] = term(load(p + k), acc[0]);
    for (; k < C; ++k) {
      const float d = to_float(p[k]) - (kSquares ? mean : 0.f);
      tail += kSquares ? d * d : d;
    }
  }
  return reduce(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + tail;
}

template <bool kStream, typename T>
inline void normalise_block(const T* p, int64_t C, float mean, float rstd, const float* w, const float* b, T* dst) {
  const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
  int64_t k = 0;
  for (; k + kLanes <= C; k += kLanes) {
    const __m256 y = _mm256_mul_ps(_mm256_sub_ps(load(p + k), vm), vr);
    store<kStream>(dst + k, _mm256_fmadd_ps(y, _mm256_loadu_ps(w + k), _mm256_loadu_ps(b + k)));
  }
  for (; k < C; ++k) dst[k] = from_float<T>((to_float(p[k]) - mean) * rstd * w[k] + b[k]);
}

template <typename T>
void layernorm_rows(const T* x, const float* w, const float* b, float eps, T* out, Geometry g, bool stream) {
  const int64_t C = g.channels;
  const float inv_width = 1.f / static_cast<float>(4 * C);
  const int64_t store_bytes = kLanes * static_cast<int64_t>(sizeof(T));
  stream = stream && C % kLanes == 0 && reinterpret_cast<uintptr_t>(out) % store_bytes == 0;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, kRowsPerChunk)
    for (int64_t r = 0; r < g.rows; ++r) {
      const T* src[4];
      source_rows(x, r, g, src);
      const float mean = row_sum<false>(src, C, 0.f) * inv_width;
      const float rstd = 1.f / std::sqrt(row_sum<true>(src, C, mean) * inv_width + eps);
      T* dst = out + r * 4 * C;
      for (int blk = 0; blk < 4; ++blk) {
        if (stream)
          normalise_block<true>(src[blk], C, mean, rstd, w + blk * C, b + blk * C, dst + blk * C);
        else
          normalise_block<false>(src[blk], C, mean, rstd, w + blk * C, b + blk * C, dst + blk * C);
      }
    }
    if (stream) _mm_sfence();
  }
}

inline void copy_stream(char* dst, const char* src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32));
  std::memcpy(dst, src, head);
  int64_t k = head;
  for (; k + 128 <= n; k += 128)
    for (int u = 0; u < 4; ++u)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k + 32 * u),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + 32 * u)));
  for (; k + 32 <= n; k += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k)));
  std::memcpy(dst + k, src + k, n - k);
}

void shuffle_rows(const char* x, char* out, Geometry g, int64_t elem_bytes, bool stream) {
  const int64_t block = g.channels * elem_bytes;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, kRowsPerChunk)
    for (int64_t r = 0; r < g.rows; ++r)
      for (int b = 0; b < 4; ++b) {
        const char* src = x + source_offset(r, b, g.side, g.channels, g.version) * elem_bytes;
        if (stream) copy_stream(out + (r * 4 + b) * block, src, block);
        else std::memcpy(out + (r * 4 + b) * block, src, block);
      }
    if (stream) _mm_sfence();
  }
}

}  // namespace avx2
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // NVLM_PS_X86

// ------------------------------------------------------------------------------------------------------------
// Launchers: argument checks (ValueError naming the argument), output allocation, ISA and dtype dispatch.
// ------------------------------------------------------------------------------------------------------------
bool use_streaming_stores(const at::Tensor& out) {
  return out.numel() * out.element_size() > last_level_cache_bytes();
}

// The output is a fresh allocation. At NVLM's size (46-92 MB) glibc maps it anew on every call and the kernel then
// faults it in 4 KB at a time when we first write it: ~11k-22k page faults, which cost more than the kernel's own
// memory traffic (measured: a 46 MB alloc + copy took 55 ms against 18 ms for the copy into an existing buffer).
// Asking for transparent huge pages on its 2 MB-aligned interior before the first write turns them into a few
// dozen faults. Best effort: ignored where THP is off or the pages already exist (a reused heap block). This is
// what PyTorch's own allocator does for every large tensor under THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const int64_t bytes = out.numel() * out.element_size();
  if (bytes < kHugePageMinBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t version) {
  const Geometry g = nvlm::pixel_shuffle::check_input(x, version);
  NVLM_CHECK_ARG(x.device().is_cpu(), "x", "must be a CPU tensor for this kernel, got ", x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1) / 4, 4 * x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t elem = x.element_size();
  [[maybe_unused]] const bool stream = use_streaming_stores(out);  // used by the x86 SIMD versions
  switch (nvlm::cpu_capability()) {
#if defined(NVLM_PS_X86)
    case nvlm::CpuCapability::kAvx512: avx512::shuffle_rows(src, dst, g, elem, stream); break;
    case nvlm::CpuCapability::kAvx2: avx2::shuffle_rows(src, dst, g, elem, stream); break;
#endif
    default: scalar::shuffle_rows(src, dst, g, elem);
  }
  return out;
}

template <typename T>
void layernorm_dispatch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, float eps, at::Tensor& out,
                        const Geometry& g) {
  const T* xp = x.const_data_ptr<T>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  T* op = out.mutable_data_ptr<T>();
  [[maybe_unused]] const bool stream = use_streaming_stores(out);  // used by the x86 SIMD versions
  switch (nvlm::cpu_capability()) {
#if defined(NVLM_PS_X86)
    case nvlm::CpuCapability::kAvx512: avx512::layernorm_rows(xp, wp, bp, eps, op, g, stream); break;
    case nvlm::CpuCapability::kAvx2: avx2::layernorm_rows(xp, wp, bp, eps, op, g, stream); break;
#endif
    default: scalar::layernorm_rows(xp, wp, bp, eps, op, g);
  }
}

at::Tensor pixel_shuffle_layernorm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       double eps, int64_t version) {
  const Geometry g = nvlm::pixel_shuffle::check_input(x, version);
  NVLM_CHECK_ARG(x.device().is_cpu(), "x", "must be a CPU tensor for this kernel, got ", x.device());
  nvlm::pixel_shuffle::check_layernorm_params(x, g, weight, bias, eps);
  const int64_t width = 4 * g.channels;
  // The affine parameters are applied in fp32 (4C values: a 51 KB copy, read from cache by every row).
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1) / 4, width}, x.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const auto feps = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat: layernorm_dispatch<float>(x, w, b, feps, out, g); break;
    case at::kHalf: layernorm_dispatch<at::Half>(x, w, b, feps, out, g); break;
    default: layernorm_dispatch<at::BFloat16>(x, w, b, feps, out, g); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CPU, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cpu);
  m.impl("pixel_shuffle_layernorm", &pixel_shuffle_layernorm_cpu);
}
