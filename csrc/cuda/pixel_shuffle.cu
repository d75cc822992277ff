// CUDA kernels for nvlm_kernels::pixel_shuffle and nvlm_kernels::pixel_shuffle_layernorm (schemas in csrc/ops.cpp,
// maths in nvlm_kernels/pixel_shuffle.py, index maths shared with the CPU kernels in csrc/common/pixel_shuffle.h).
//
// x [T, N, C] -> out [T, N/4, 4C]; one thread block per output row. The row is four contiguous C-wide source rows,
// read and written with 16-byte vectors (8 bf16/fp16 or 4 fp32) when C and the pointers allow, else element-wise.
//
// pixel_shuffle_layernorm keeps its row in registers: each thread loads kVpt vectors (at most 8, i.e. 64 fp32
// values), the block reduces the sum (warp shuffles, then one value per warp through shared memory), then the sum
// of squared deviations from the mean (two-pass variance, exact as PyTorch's even when |mean| >> std), and writes
// the normalised row once. NVLM's 12800-wide bf16 row = 1600 vectors = 400 threads x 4. Rows too wide for that
// (4C > 8 * 512 vectors) or not vectorisable use a generic kernel that re-reads the row from L2.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "common/pixel_shuffle.h"

namespace {

using nvlm::pixel_shuffle::Geometry;
using nvlm::pixel_shuffle::source_offset;

constexpr int kVecBytes = 16;
constexpr int kMaxThreads = 512;  // threads of the register-resident LN kernel (launch bound)
constexpr int kMaxVpt = 8;        // 16-byte vectors per thread in that kernel

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kN values of type V at p (16-byte aligned) -> fp32, with 16-byte loads.
template <int kN, typename V>
__device__ __forceinline__ void load_f32(const V* p, float* out) {
  constexpr int kPer = kVecBytes / sizeof(V);  // values per 16-byte load
  static_assert(kN % kPer == 0, "whole 16-byte vectors only");
#pragma unroll
  for (int q = 0; q < kN / kPer; ++q) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + q * kPer);
    const V* e = reinterpret_cast<const V*>(&raw);
#pragma unroll
    for (int k = 0; k < kPer; ++k) out[q * kPer + k] = to_f(e[k]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32). `scratch` holds one float per warp; the trailing barrier
// lets the caller reuse it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

// The 4 source rows of output row `row`, held in registers (a select chain, not a local-memory array).
template <typename T>
struct SourceRows {
  const T* p0;
  const T* p1;
  const T* p2;
  const T* p3;
  __device__ __forceinline__ SourceRows(const T* x, int64_t row, int64_t side, int64_t channels, int version)
      : p0(x + source_offset(row, 0, side, channels, version)),
        p1(x + source_offset(row, 1, side, channels, version)),
        p2(x + source_offset(row, 2, side, channels, version)),
        p3(x + source_offset(row, 3, side, channels, version)) {}
  __device__ __forceinline__ const T* operator[](int b) const { return b == 0 ? p0 : b == 1 ? p1 : b == 2 ? p2 : p3; }
};

// ----------------------------------------------------------------------------------------------------------------
// pixel_shuffle: copy in units U (uint4 = 16 bytes when aligned, else the element type). `units` = C in units of U.
// ----------------------------------------------------------------------------------------------------------------
template <typename U>
__global__ void pixel_shuffle_kernel(const U* __restrict__ x, U* __restrict__ out, int64_t side, int units,
                                     int version) {
  const int64_t row = blockIdx.x;
  const SourceRows<U> src(x, row, side, units, version);
  U* dst = out + row * 4 * units;
  for (int i = threadIdx.x; i < 4 * units; i += blockDim.x) {
    const int b = i / units;
    dst[i] = src[b][i - b * units];
  }
}

// ----------------------------------------------------------------------------------------------------------------
// pixel_shuffle_layernorm, register-resident row, 16-byte vectors (C % (16 / sizeof(T)) == 0, aligned pointers).
// W, the weight/bias type, is T (the model's own parameters, read as they are) or float (converted by the launcher).
// ----------------------------------------------------------------------------------------------------------------
template <typename T, typename W, int kVpt>
__global__ void __launch_bounds__(kMaxThreads)
    pixel_shuffle_layernorm_vec_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                                       const W* __restrict__ bias, T* __restrict__ out, int64_t side,
                                       int64_t channels, int version, float eps) {
  constexpr int kElems = kVecBytes / sizeof(T);  // values per vector
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  // 32-bit index maths within the row (the launcher guarantees row_vecs <= kMaxVpt * kMaxThreads).
  const int block_vecs = static_cast<int>(channels / kElems);  // vectors per channel block
  const int row_vecs = 4 * block_vecs;
  const float inv_width = 1.f / static_cast<float>(4 * channels);
  const SourceRows<T> src(x, row, side, channels, version);

  float v[kVpt][kElems];
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kVpt; ++u) {
    const int i = threadIdx.x + u * blockDim.x;  // vector index in the output row
    if (i < row_vecs) {
      const int b = i / block_vecs;
      load_f32<kElems>(src[b] + (i - b * block_vecs) * kElems, v[u]);
#pragma unroll
      for (int k = 0; k < kElems; ++k) sum += v[u][k];
    } else {
#pragma unroll
      for (int k = 0; k < kElems; ++k) v[u][k] = 0.f;
    }
  }
  const float mean = block_sum(sum, scratch) * inv_width;

  float sq = 0.f;
#pragma unroll
  for (int u = 0; u < kVpt; ++u) {
    if (static_cast<int>(threadIdx.x + u * blockDim.x) < row_vecs) {
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        const float d = v[u][k] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) * inv_width + eps);

  T* dst = out + row * 4 * channels;
#pragma unroll
  for (int u = 0; u < kVpt; ++u) {
    const int i = threadIdx.x + u * blockDim.x;
    if (i < row_vecs) {
      const int c = i * kElems;  // first output channel of this vector (= b * C + offset in block)
      float w[kElems], b[kElems];
      load_f32<kElems>(weight + c, w);
      load_f32<kElems>(bias + c, b);
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kElems; ++k) e[k] = from_f<T>((v[u][k] - mean) * rstd * w[k] + b[k]);
      *reinterpret_cast<uint4*>(dst + c) = raw;
    }
  }
}

// ----------------------------------------------------------------------------------------------------------------
// pixel_shuffle_layernorm, generic: any C, any alignment, any width. Three element-wise passes; the 2nd and 3rd
// re-read the row from L2.
// ----------------------------------------------------------------------------------------------------------------
template <typename T, typename W>
__global__ void pixel_shuffle_layernorm_generic_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                                                       const W* __restrict__ bias, T* __restrict__ out,
                                                       int64_t side, int64_t channels, int version, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int C = static_cast<int>(channels);  // the launcher checks 4C < 2^31
  const int width = 4 * C;
  const float inv_width = 1.f / static_cast<float>(width);
  const SourceRows<T> src(x, row, side, channels, version);
  auto value = [&](int c) {
    const int b = c / C;
    return to_f(src[b][c - b * C]);
  };
  float sum = 0.f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) sum += value(c);
  const float mean = block_sum(sum, scratch) * inv_width;
  float sq = 0.f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const float d = value(c) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) * inv_width + eps);
  T* dst = out + row * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x)
    dst[c] = from_f<T>((value(c) - mean) * rstd * to_f(weight[c]) + to_f(bias[c]));
}

// ----------------------------------------------------------------------------------------------------------------
// Launchers
// ----------------------------------------------------------------------------------------------------------------
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

int round_up_warps(int64_t threads) { return static_cast<int>((threads + 31) / 32 * 32); }

// One block per output row; rows and in-row indices must fit the grid and 32-bit maths.
void check_launch(const at::Tensor& x, const Geometry& g) {
  NVLM_CHECK_ARG(g.rows <= int64_t{0x7fffffff} && 4 * g.channels * x.element_size() <= int64_t{0x7fffffff}, "x",
                 "is too large for one CUDA launch (", g.rows, " output rows of ", 4 * g.channels, " values)");
}

at::Tensor pixel_shuffle_cuda(const at::Tensor& x, int64_t version) {
  const Geometry g = nvlm::pixel_shuffle::check_input(x, version);
  NVLM_CHECK_ARG(x.is_cuda(), "x", "must be a CUDA tensor for this kernel, got ", x.device());
  check_launch(x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1) / 4, 4 * g.channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = g.channels * x.element_size();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const void* xp = x.const_data_ptr();
  void* op = out.mutable_data_ptr();
  if (row_bytes % kVecBytes == 0 && aligned16(xp) && aligned16(op)) {
    const int units = static_cast<int>(row_bytes / kVecBytes);
    const int threads = static_cast<int>(std::min<int64_t>(256, round_up_warps(4 * units)));
    pixel_shuffle_kernel<uint4><<<static_cast<unsigned>(g.rows), threads, 0, stream>>>(static_cast<const uint4*>(xp),
                                                                 static_cast<uint4*>(op), g.side, units, g.version);
  } else if (x.element_size() == 4) {
    pixel_shuffle_kernel<uint32_t><<<static_cast<unsigned>(g.rows), 256, 0, stream>>>(static_cast<const uint32_t*>(xp),
                                                                static_cast<uint32_t*>(op), g.side,
                                                                static_cast<int>(g.channels),
                                                                g.version);
  } else {
    pixel_shuffle_kernel<uint16_t><<<static_cast<unsigned>(g.rows), 256, 0, stream>>>(static_cast<const uint16_t*>(xp),
                                                                static_cast<uint16_t*>(op), g.side,
                                                                static_cast<int>(g.channels),
                                                                g.version);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T, typename W>
void launch_layernorm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& out,
                      const Geometry& g, float eps, cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  const auto* wp = reinterpret_cast<const W*>(w.const_data_ptr());
  const auto* bp = reinterpret_cast<const W*>(b.const_data_ptr());
  auto* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  constexpr int kElems = kVecBytes / sizeof(T);
  const int64_t row_vecs = 4 * g.channels / kElems;
  const bool vectorisable = g.channels % kElems == 0 && aligned16(xp) && aligned16(op) && aligned16(wp) &&
                            aligned16(bp) && row_vecs <= int64_t{kMaxVpt} * kMaxThreads;
  if (!vectorisable) {
    pixel_shuffle_layernorm_generic_kernel<T, W><<<static_cast<unsigned>(g.rows), 256, 0, stream>>>(xp, wp, bp, op, g.side, g.channels,
                                                                          g.version, eps);
    return;
  }
  // Fewest vectors per thread (1, 2, 4 or 8) that cover the row with at most kMaxThreads threads.
  int vpt = 1;
  while (row_vecs > int64_t{vpt} * kMaxThreads) vpt *= 2;
  const int threads = round_up_warps((row_vecs + vpt - 1) / vpt);
#define NVLM_PS_LN_LAUNCH(V)                                                                                   \
  pixel_shuffle_layernorm_vec_kernel<T, W, V><<<static_cast<unsigned>(g.rows), threads, 0, stream>>>(xp, wp, bp, op, g.side, g.channels, \
                                                                           g.version, eps)
  switch (vpt) {
    case 1: NVLM_PS_LN_LAUNCH(1); break;
    case 2: NVLM_PS_LN_LAUNCH(2); break;
    case 4: NVLM_PS_LN_LAUNCH(4); break;
    default: NVLM_PS_LN_LAUNCH(8); break;
  }
#undef NVLM_PS_LN_LAUNCH
}

at::Tensor pixel_shuffle_layernorm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        double eps, int64_t version) {
  const Geometry g = nvlm::pixel_shuffle::check_input(x, version);
  NVLM_CHECK_ARG(x.is_cuda(), "x", "must be a CUDA tensor for this kernel, got ", x.device());
  nvlm::pixel_shuffle::check_layernorm_params(x, g, weight, bias, eps);
  check_launch(x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  // weight/bias in x's dtype (the model's case) are read as they are; any other dtype is converted to fp32 first
  // (an extra small kernel). Both are 4C values, read from L2 by every row.
  const bool same = weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type();
  const at::Tensor w = same ? weight.contiguous() : weight.to(at::kFloat).contiguous();
  const at::Tensor b = same ? bias.contiguous() : bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1) / 4, 4 * g.channels}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto feps = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat: launch_layernorm<float, float>(x, w, b, out, g, feps, stream); break;
    case at::kHalf:
      if (same) launch_layernorm<__half, __half>(x, w, b, out, g, feps, stream);
      else launch_layernorm<__half, float>(x, w, b, out, g, feps, stream);
      break;
    default:
      if (same) launch_layernorm<__nv_bfloat16, __nv_bfloat16>(x, w, b, out, g, feps, stream);
      else launch_layernorm<__nv_bfloat16, float>(x, w, b, out, g, feps, stream);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CUDA, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cuda);
  m.impl("pixel_shuffle_layernorm", &pixel_shuffle_layernorm_cuda);
}
