// CPU kernels for nvlm_kernels::pixel_shuffle and nvlm_kernels::pixel_shuffle_layernorm (schemas in csrc/ops.cpp,
// maths in nvlm_kernels/pixel_shuffle.py, index maths in csrc/common/pixel_shuffle.h).
//
// x [T, N, C] -> out [T, N/4, 4C]. Each output row is four C-wide source rows placed side by side, so
//   * pixel_shuffle is four contiguous block copies per output row;
//   * pixel_shuffle_layernorm reads the four source blocks of a row (4C = 12800 values, 25-51 KB: they stay in
//     L2 after the first pass), computes the fp32 mean and variance from one pass of shifted sums (a second pass
//     around the mean, from L2, where those cancel: as accurate as PyTorch's LayerNorm even when |mean| >> std),
//     and writes the normalised rows once, four rows at a time so that each loaded weight/bias vector serves four
//     rows (pixel_shuffle_simd.inc).
// Every byte of x is read from memory once and every byte of out written once. Outputs larger than the last-level
// cache are written with non-temporal (streaming) stores: they bypass the cache and skip the read-for-ownership a
// normal store does, so the traffic is read + write instead of read + read + write (glibc's memcpy does the same for
// large copies). While a thread writes one group of rows it reads the next group's source rows from memory (their
// plain sums, the first statistics pass, are computed in the same loop), so its reads and writes overlap. Large
// outputs also get transparent huge pages before the first write (advise_huge_pages): faulting a fresh 46 MB output
// in 4 KB pages cost more than the kernel itself.
//
// Versions chosen at run time by nvlm::cpu_capability() (NVLM_KERNELS_CPU_ISA caps it): AVX-512 (with an
// AVX512_BF16 variant of the bf16 LayerNorm), AVX2 and scalar; the SIMD ones are one source,
// pixel_shuffle_simd.inc, compiled per ISA. fp32 -> bf16 rounds to nearest even exactly like c10 (NaN kept quiet,
// denormals kept), fp16 uses F16C. Rows are split across OpenMP threads in chunks.
//
// Environment (read on every call; for tests): NVLM_KERNELS_CPU_ISA=avx2|scalar caps the ISA,
// NVLM_KERNELS_CPU_BF16=0 disables the AVX512_BF16 variant, NVLM_KERNELS_CPU_STREAM=1|0 forces streaming stores.
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
#include <cstdlib>
#include <cstring>
#include <type_traits>

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
// SIMD versions. The kernels are written once, in pixel_shuffle_simd.inc, over a small vector-ops struct `Ops`;
// each ISA below defines its Ops and includes that file inside a `#pragma GCC target` region, so every function
// of that copy (and the OpenMP bodies outlined from them) gets the target and the intrinsics inline. Nothing in a
// region runs unless the run-time dispatch chose it.
// ------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
// GCC 12's intrinsic headers trip -Wmaybe-uninitialized on their own `__m512i __Y = __Y;` placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

// fp32 -> bf16 of 16 values, rounding to nearest even as c10::BFloat16 does (bits + 0x7FFF + bit 16, high half);
// a NaN becomes the quiet NaN 0x7FC0 (adding could carry its payload into the exponent and make it an infinity).
// Returns the rounded 32-bit patterns: the bf16 is the high half of each lane.
inline __m512i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

struct Ops {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kStoreAlign = 64;  // every store in store2 writes one aligned 64-byte line
  static constexpr int kVecBytes = 64;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void stream_copy(char* dst, const char* src) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(reinterpret_cast<const void*>(src)));
  }

  template <bool kStream>
  static void store2(float* p, V lo, V hi) {
    if constexpr (kStream) _mm512_stream_ps(p, lo), _mm512_stream_ps(p + kLanes, hi);
    else _mm512_storeu_ps(p, lo), _mm512_storeu_ps(p + kLanes, hi);
  }
  // fp16 (F16C conversions, round to nearest even)
  static V load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  template <bool kStream>
  static void store2(at::Half* p, V lo, V hi) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(lo, kRound)),
                                         _mm512_cvtps_ph(hi, kRound), 1);
    store_bits<kStream>(p, h);
  }
  // bf16 is the high half of an fp32: widening is a shift
  static V load(const at::BFloat16* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  // even values (shifted up) in a, odd values (low half cleared) in b: two cheap in-lane ops for 32 values
  static void load2_any_order(const at::BFloat16* p, V& a, V& b) {
    const __m512i u = _mm512_loadu_si512(static_cast<const void*>(p));
    a = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  template <bool kStream>
  static void store2(at::BFloat16* p, V lo, V hi) {
    // the high halves of the 32 rounded lanes, in order: words 1, 3, ..., 31 of lo then of hi (index 32+ = hi)
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31,
                                               29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    store_bits<kStream>(p, _mm512_permutex2var_epi16(round_bf16(lo), odd_words, round_bf16(hi)));
  }
  template <bool kStream>
  static void store_bits(void* p, __m512i v) {
    if constexpr (kStream) _mm512_stream_si512(static_cast<__m512i*>(p), v);
    else _mm512_storeu_si512(p, v);
  }
};

#include "cpu/pixel_shuffle_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------------------
// AVX-512 with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids): the bf16 store is one vcvtne2ps2bf16 for 32
// values. That instruction rounds to nearest even like c10 but turns denormals into zero and keeps a NaN's
// payload, so a step whose values include a NaN or a denormal (vfpclassps) is rounded the exact way instead.
// ------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {

struct Ops : avx512::Ops {
  using avx512::Ops::store2;
  template <bool kStream>
  static void store2(at::BFloat16* p, V lo, V hi) {
    constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN | denormal | signalling NaN
    if (_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) {
      avx512::Ops::store2<kStream>(p, lo, hi);
      return;
    }
    store_bits<kStream>(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));  // lo -> the low 16 values
  }
};

#include "cpu/pixel_shuffle_simd.inc"

}  // namespace avx512bf16
#pragma GCC diagnostic pop
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------------------
// AVX2 version: the same kernels with 8 fp32 lanes.
// ------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// fp32 -> bf16 of 8 values as 8 x u32 < 65536 (the bf16 in the low half), rounding as avx512::round_bf16.
inline __m256i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  return _mm256_srli_epi32(r, 16);
}

struct Ops {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kStoreAlign = 32;
  static constexpr int kVecBytes = 32;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void stream_copy(char* dst, const char* src) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }

  template <bool kStream>
  static void store2(float* p, V lo, V hi) {
    if constexpr (kStream) _mm256_stream_ps(p, lo), _mm256_stream_ps(p + kLanes, hi);
    else _mm256_storeu_ps(p, lo), _mm256_storeu_ps(p + kLanes, hi);
  }
  // fp16
  static V load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  template <bool kStream>
  static void store2(at::Half* p, V lo, V hi) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    store_bits<kStream>(p, _mm256_set_m128i(_mm256_cvtps_ph(hi, kRound), _mm256_cvtps_ph(lo, kRound)));
  }
  // bf16
  static V load(const at::BFloat16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static void load2_any_order(const at::BFloat16* p, V& a, V& b) {  // even values in a, odd values in b
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  template <bool kStream>
  static void store2(at::BFloat16* p, V lo, V hi) {
    // packus interleaves the 128-bit halves (lo0-3 hi0-3 lo4-7 hi4-7); the 64-bit permute puts them back in order
    const __m256i packed = _mm256_packus_epi32(round_bf16(lo), round_bf16(hi));
    store_bits<kStream>(p, _mm256_permute4x64_epi64(packed, 0xD8));
  }
  template <bool kStream>
  static void store_bits(void* p, __m256i v) {
    if constexpr (kStream) _mm256_stream_si256(static_cast<__m256i*>(p), v);
    else _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
};

#include "cpu/pixel_shuffle_simd.inc"

}  // namespace avx2
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // NVLM_PS_X86

// ------------------------------------------------------------------------------------------------------------
// Launchers: argument checks (ValueError naming the argument), output allocation, ISA and dtype dispatch.
// ------------------------------------------------------------------------------------------------------------
// NVLM_KERNELS_CPU_STREAM=1 / =0 (read on every call) forces streaming stores on / off whatever the size, so the
// tests can run that path on small shapes (it is still skipped where the row layout cannot be stored aligned).
bool use_streaming_stores(const at::Tensor& out) {
  if (const char* env = std::getenv("NVLM_KERNELS_CPU_STREAM")) {
    if (std::strcmp(env, "1") == 0) return true;
    if (std::strcmp(env, "0") == 0) return false;
  }
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

#if defined(NVLM_PS_X86)
// Whether the AVX-512 bf16 kernels may use the AVX512_BF16 conversion instruction. NVLM_KERNELS_CPU_BF16=0 turns it
// off (read on every call), so the tests also exercise the exact integer rounding on machines that have it.
bool use_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512dq");
  const char* env = std::getenv("NVLM_KERNELS_CPU_BF16");
  return has && !(env != nullptr && std::strcmp(env, "0") == 0);
}
#endif

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
    case nvlm::CpuCapability::kAvx512:
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (use_avx512_bf16()) {
          avx512bf16::layernorm_rows(xp, wp, bp, eps, op, g, stream);
          break;
        }
      }
      avx512::layernorm_rows(xp, wp, bp, eps, op, g, stream);
      break;
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
