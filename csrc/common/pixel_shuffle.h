// Index maths of the pixel shuffle (downsample 0.5), shared by the CPU kernels (csrc/cpu/pixel_shuffle.cpp) and
// the CUDA kernels (csrc/cuda/pixel_shuffle.cu), so the CPU tests exercise the exact code the GPU runs.
//
// x: [T, N, C], N = s*s patches of one tile in row-major order (s even). Output [T, N/4, 4C]: output token t of a
// tile, with half = s/2, covers the 2x2 patch block (i, j) and its 4C channels are four C-wide source rows
//     ps_version 2: t = half*i + j          ps_version 1: t = half*j + i   (same blocks, transposed token order)
//     channel block b (0..3) = X[2i + b/2, 2j + b%2], i.e. source token (2i + b/2)*s + 2j + b%2.
// See nvlm_spec.md §3; nvlm_kernels/pixel_shuffle.py keeps InternVL's view/permute code as the reference.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/checks.h"

#ifndef NVLM_HOST_DEVICE
#if defined(__CUDACC__)
#define NVLM_HOST_DEVICE __host__ __device__
#else
#define NVLM_HOST_DEVICE
#endif
#endif

namespace nvlm {
namespace pixel_shuffle {

// Source token (within its tile, 0..s*s-1) of channel block `block` (0..3) of output token `out_token`
// (within its tile, 0..s*s/4-1).
NVLM_HOST_DEVICE inline int64_t source_token(int64_t out_token, int block, int64_t side, int version) {
  const int64_t half = side / 2;
  const int64_t major = out_token / half;  // i for v2, j for v1
  const int64_t minor = out_token % half;
  const int64_t i = version == 1 ? minor : major;  // output grid row (pairs of source rows)
  const int64_t j = version == 1 ? major : minor;  // output grid column (pairs of source columns)
  return (2 * i + block / 2) * side + 2 * j + block % 2;
}

// Offset in elements of the first of the C source channels of channel block `block` of output row `out_row`
// (0..T*N/4-1, over all tiles) in the contiguous input x[T, N, C].
NVLM_HOST_DEVICE inline int64_t source_offset(int64_t out_row, int block, int64_t side, int64_t channels,
                                              int version) {
  const int64_t tokens_out = side * side / 4;  // per tile
  const int64_t tile = out_row / tokens_out;
  const int64_t token = source_token(out_row % tokens_out, block, side, version);
  return (tile * side * side + token) * channels;
}

// ------------------------------------------------------------------------------------------------------------
// Host side: argument checks shared by the CPU and CUDA launchers (ValueError naming the argument).
// ------------------------------------------------------------------------------------------------------------
struct Geometry {
  int64_t rows;      // T * N / 4 output rows
  int64_t side;      // s, N = s*s
  int64_t channels;  // C; an output row is 4C wide
  int version;       // 1 or 2
};

// x [T, N, C]: float32/float16/bfloat16, contiguous, N = s*s with s even; version 1 or 2. The caller checks the
// device.
inline Geometry check_input(const at::Tensor& x, int64_t version) {
  NVLM_CHECK_DIM(x, "x", 3);
  NVLM_CHECK_FLOAT(x, "x");
  NVLM_CHECK_CONTIGUOUS(x, "x");
  NVLM_CHECK_ARG(version == 1 || version == 2, "version", "must be 1 or 2, got ", version);
  const int64_t n = x.size(1);
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  NVLM_CHECK_ARG(side > 0 && side * side == n && side % 2 == 0, "x",
                 "must have N = s*s tokens with s even (dim 1), got shape ", x.sizes());
  return Geometry{x.size(0) * n / 4, side, x.size(2), static_cast<int>(version)};
}

// LayerNorm parameters of pixel_shuffle_layernorm: weight, bias [4C] float on x's device; eps finite, >= 0.
inline void check_layernorm_params(const at::Tensor& x, const Geometry& g, const at::Tensor& weight,
                                   const at::Tensor& bias, double eps) {
  NVLM_CHECK_ARG(g.channels > 0, "x", "must have C >= 1 channels (dim 2), got shape ", x.sizes());
  const int64_t width = 4 * g.channels;
  auto check_param = [&](const at::Tensor& p, const char* name) {
    NVLM_CHECK_ARG(p.dim() == 1 && p.size(0) == width, name, "must have shape (", width, ",), got ", p.sizes());
    NVLM_CHECK_FLOAT(p, name);
    NVLM_CHECK_SAME_DEVICE(x, "x", p, name);
  };
  check_param(weight, "weight");
  check_param(bias, "bias");
  NVLM_CHECK_ARG(std::isfinite(eps) && eps >= 0, "eps", "must be finite and >= 0, got ", eps);
}

}  // namespace pixel_shuffle
}  // namespace nvlm
