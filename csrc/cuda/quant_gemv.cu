// CUDA implementation of nvlm_kernels::w8a16_linear / w4a16_linear (schemas in csrc/ops.cpp; format in
// csrc/common/quant_layout.h, defined by nvlm_kernels/packing.py).
//
// Decode GEMV (M <= quant::kGemvMaxMCuda = 8 rows of x; the routing rule is quant_linear.select_kernel):
//   * one warp per output row n, kWarps rows per block; lane l reads 16-byte packets l, l+32, ... of the packed row
//     (int4: 32 weights, int8: 16 weights per packet), so a warp issues fully coalesced 512-byte loads;
//   * weights are decoded in registers through quant_layout.h (nibble order, zero point), integer -> float with
//     the 0x4B000000 exponent trick (an OR + FADD instead of the quarter-rate I2F);
//   * int4 factors scale and zero point out of each packet (a packet never straddles a group since g >= 32):
//       sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k),   so each weight costs one FMA;
//   * the x rows (M x K, <= 128 KiB) are read through the read-only cache and shared by every warp;
//   * fp32 accumulation, warp-shuffle reduction, lane 0 writes y[m, n] (+ bias) in x's dtype.
// Larger M: dequantise the weight to x's dtype with a simple elementwise kernel, then at::matmul (cuBLAS tensor
// cores) — prefill is compute bound and the Triton GEMM backend covers the fused version.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/quant_checks.h"
#include "common/quant_layout.h"

namespace {

namespace q = nvlm::quant;

constexpr int kWarps = 4;  // output rows (warps) per block

// ---- small device helpers --------------------------------------------------------------------------------------
__device__ __forceinline__ float u8_to_float(uint32_t v) {  // exact for 0 <= v < 2^22
  return __uint_as_float(v | 0x4B000000u) - 8388608.f;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive activations -> fp32: one 16-byte load (two for fp32); 16-bit values are unpacked with shifts so the
// packet never goes through local memory.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out);
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* out) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

// Scales may be fp16 / bf16 / fp32: a warp-uniform switch is cheaper than tripling the instantiations.
__device__ __forceinline__ float load_scale(const void* s, int stype, int64_t i) {
  if (stype == 1) return __half2float(static_cast<const __half*>(s)[i]);
  if (stype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(s)[i]);
  return static_cast<const float*>(s)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- int4 GEMV ---------------------------------------------------------------------------------------------------
// x [M, K], qw uint8 [N, K/2], scales [N, K/G], zeros uint8 [N, K/G], bias fp32 [N] or null, y [M, N].
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32) w4a16_gemv_kernel(const T* __restrict__ x,
                                                                 const uint8_t* __restrict__ qw,
                                                                 const void* __restrict__ scales, int stype,
                                                                 const uint8_t* __restrict__ zeros,
                                                                 const float* __restrict__ bias, T* __restrict__ y,
                                                                 int M, int N, int K, int G) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t row_bytes = K / 2, ngroups = K / G;
  const uint8_t* row = qw + n * row_bytes;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  // Two packets in flight per lane. (Branching on m < M inside this loop made ptxas spill 12 bytes for MT = 4, 8;
  // the clamped row index below keeps every kernel spill-free on sm_80 and sm_90a.)
#pragma unroll 2
  for (int64_t b = lane * 16; b < row_bytes; b += 32 * 16) {  // b: byte offset of this lane's 16-byte packet
    const uint4 pk = __ldg(reinterpret_cast<const uint4*>(row + b));
    const int64_t k0 = 2 * b;                                    // first of the packet's 32 weights
    const int64_t g = q::group_of(k0, G);
    const float s = load_scale(scales, stype, n * ngroups + g);
    const float z = static_cast<float>(zeros[n * ngroups + g] & 15);
    const uint32_t words[4] = {pk.x, pk.y, pk.z, pk.w};          // word i: weights k0 + 8i .. k0 + 8i + 7
    float qx[MT], sx[MT];                                        // sum q x and sum x over the packet, per row
#pragma unroll
    for (int m = 0; m < MT; ++m) qx[m] = sx[m] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float wq[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) wq[j] = u8_to_float(q::int4_from_word(words[i], j));
#pragma unroll
      for (int m = 0; m < MT; ++m) {  // rows m >= M (MT rounds M up) recompute row M-1; they are not stored
        float xv[8];
        load8(x + static_cast<int64_t>(m < M ? m : M - 1) * K + k0 + 8 * i, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          qx[m] = fmaf(wq[j], xv[j], qx[m]);
          sx[m] += xv[j];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = fmaf(s, fmaf(-z, sx[m], qx[m]), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) y[static_cast<int64_t>(m) * N + n] = from_float<T>(v + (bias ? bias[n] : 0.f));
    }
  }
}

// ---- int8 GEMV ---------------------------------------------------------------------------------------------------
template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32) w8a16_gemv_kernel(const T* __restrict__ x,
                                                                 const int8_t* __restrict__ qw,
                                                                 const void* __restrict__ scale, int stype,
                                                                 const float* __restrict__ bias, T* __restrict__ y,
                                                                 int M, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int8_t* row = qw + static_cast<int64_t>(n) * K;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const int64_t kvec = K / 16 * 16;  // 16-byte packets; K % 16 leftovers below
#pragma unroll 2
  for (int64_t k0 = lane * 16; k0 < kvec; k0 += 32 * 16) {
    const uint4 pk = __ldg(reinterpret_cast<const uint4*>(row + k0));
    const uint32_t words[4] = {pk.x, pk.y, pk.z, pk.w};
    float wq[16];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)  // signed byte -> [0, 255] -> exact float, minus the 128 offset
        wq[4 * i + j] = u8_to_float(((words[i] >> (8 * j)) & 0xFFu) ^ 0x80u) - 128.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float xv[8];
          load8(x + static_cast<int64_t>(m) * K + k0 + 8 * i, xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[m] = fmaf(wq[8 * i + j], xv[j], acc[m]);
        }
      }
    }
  }
  for (int64_t k = kvec + lane; k < K; k += 32) {  // tail (K not a multiple of 16)
    const float wv = static_cast<float>(row[k]);
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) acc[m] = fmaf(wv, to_float(x[static_cast<int64_t>(m) * K + k]), acc[m]);
  }
  const float s = load_scale(scale, stype, n);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) y[static_cast<int64_t>(m) * N + n] = from_float<T>(v * s + (bias ? bias[n] : 0.f));
    }
  }
}

// ---- dequantise (GEMM fallback) ----------------------------------------------------------------------------------
template <typename T>
__global__ void dequant_int4_kernel(const uint8_t* __restrict__ qw, const void* __restrict__ scales, int stype,
                                    const uint8_t* __restrict__ zeros, T* __restrict__ w, int64_t N, int64_t K,
                                    int G) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // byte index
  if (i >= N * (K / 2)) return;
  const int64_t n = i / (K / 2), k = 2 * (i % (K / 2));
  const int64_t gi = n * (K / G) + q::group_of(k, G);
  const float s = load_scale(scales, stype, gi);
  const int z = zeros[gi] & 15;
  const uint8_t byte = qw[i];
  w[n * K + k] = from_float<T>(q::int4_dequant(q::int4_lo(byte), z, s));
  w[n * K + k + 1] = from_float<T>(q::int4_dequant(q::int4_hi(byte), z, s));
}

template <typename T>
__global__ void dequant_int8_kernel(const int8_t* __restrict__ qw, const void* __restrict__ scale, int stype,
                                    T* __restrict__ w, int64_t N, int64_t K) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * K) return;
  w[i] = from_float<T>(q::int8_dequant(qw[i], load_scale(scale, stype, i / K)));
}

// ---- host side ---------------------------------------------------------------------------------------------------
int scale_code(const at::Tensor& s) {
  return s.scalar_type() == at::kHalf ? 1 : s.scalar_type() == at::kBFloat16 ? 2 : 0;
}

// Calls f(T{}) with T the CUDA type of x's dtype (fp32 / fp16 / bf16; checked before).
template <typename F>
void dispatch_x(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// Calls f.template operator()<MT>() with MT the smallest of 1, 2, 4, 8 that is >= m.
template <typename F>
void with_mt(int64_t m, F&& f) {
  if (m <= 1) f(std::integral_constant<int, 1>{});
  else if (m <= 2) f(std::integral_constant<int, 2>{});
  else if (m <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

// 16-byte vector loads need 16-byte aligned rows; torch allocations are, offset views may not be.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor gemm_fallback(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  auto y = at::matmul(x2, w.t());
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return y;
}

at::Tensor w4a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const nvlm::QuantShape sh = nvlm::check_w4a16_args(x, qweight, scales, zeros, group_size, bias);
  const int64_t n = sh.n, k = sh.k;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = k > 0 ? x.numel() / k : 0;
  if (m == 0 || n == 0) return at::zeros(out_shape(x, n), x.options());
  const auto x2 = aligned16(x.reshape({m, k}).contiguous());
  const auto qw = aligned16(qweight);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (m > q::kGemvMaxMCuda) {
    auto w = at::empty({n, k}, x.options());
    const int64_t bytes = n * (k / 2);
    dispatch_x(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      dequant_int4_kernel<T><<<(bytes + 255) / 256, 256, 0, stream>>>(
          qw.data_ptr<uint8_t>(), scales.data_ptr(), scale_code(scales), zeros.data_ptr<uint8_t>(),
          reinterpret_cast<T*>(w.data_ptr()), n, k, static_cast<int>(group_size));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return gemm_fallback(x2, w, bias).view(out_shape(x, n));
  }
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::empty({m, n}, x.options());
  const dim3 grid((n + kWarps - 1) / kWarps), block(kWarps * 32);
  dispatch_x(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_mt(m, [&](auto mt) {
      w4a16_gemv_kernel<T, decltype(mt)::value><<<grid, block, 0, stream>>>(
          reinterpret_cast<const T*>(x2.data_ptr()), qw.data_ptr<uint8_t>(), scales.data_ptr(),
          scale_code(scales), zeros.data_ptr<uint8_t>(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
          reinterpret_cast<T*>(y.data_ptr()), static_cast<int>(m), static_cast<int>(n),
          static_cast<int>(k), static_cast<int>(group_size));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.view(out_shape(x, n));
}

at::Tensor w8a16_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias) {
  const nvlm::QuantShape sh = nvlm::check_w8a16_args(x, qweight, scale, bias);
  const int64_t n = sh.n, k = sh.k;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = k > 0 ? x.numel() / k : 0;
  if (m == 0 || n == 0) return at::zeros(out_shape(x, n), x.options());
  // 16-byte packets need K % 16 == 0 for row alignment; otherwise take the dequantise + cuBLAS path.
  const bool gemv = m <= q::kGemvMaxMCuda && k % 16 == 0;
  const auto x2 = aligned16(x.reshape({m, k}).contiguous());
  const auto qw = aligned16(qweight);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!gemv) {
    auto w = at::empty({n, k}, x.options());
    dispatch_x(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      dequant_int8_kernel<T><<<(n * k + 255) / 256, 256, 0, stream>>>(
          qw.data_ptr<int8_t>(), scale.data_ptr(), scale_code(scale), reinterpret_cast<T*>(w.data_ptr()),
          n, k);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return gemm_fallback(x2, w, bias).view(out_shape(x, n));
  }
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::empty({m, n}, x.options());
  const dim3 grid((n + kWarps - 1) / kWarps), block(kWarps * 32);
  dispatch_x(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_mt(m, [&](auto mt) {
      w8a16_gemv_kernel<T, decltype(mt)::value><<<grid, block, 0, stream>>>(
          reinterpret_cast<const T*>(x2.data_ptr()), qw.data_ptr<int8_t>(), scale.data_ptr(),
          scale_code(scale), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
          reinterpret_cast<T*>(y.data_ptr()), static_cast<int>(m), static_cast<int>(n),
          static_cast<int>(k));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.view(out_shape(x, n));
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CUDA, m) {
  m.impl("w8a16_linear", &w8a16_linear_cuda);
  m.impl("w4a16_linear", &w4a16_linear_cuda);
}
