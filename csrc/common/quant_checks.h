// Argument checks shared by the CPU and CUDA launchers of w8a16_linear / w4a16_linear (host code only).
// Every failure is a c10::ValueError (Python ValueError) naming the argument (common/checks.h).
#pragma once

#include <optional>

#include "common/checks.h"
#include "common/quant_layout.h"

namespace nvlm {

// The checks every quantised linear makes: x [..., K] float, qweight/scales contiguous on x's device, bias [N].
inline void check_quant_linear_common(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                      const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t n,
                                      int64_t k) {
  NVLM_CHECK_FLOAT(x, "x");
  NVLM_CHECK_ARG(x.dim() >= 1 && x.size(-1) == k, "x", op, ": last dimension must be K=", k, " (from qweight ",
                 qweight.sizes(), "), got shape ", x.sizes());
  NVLM_CHECK_SAME_DEVICE(x, "x", qweight, "qweight");
  NVLM_CHECK_SAME_DEVICE(x, "x", scales, "scale(s)");
  NVLM_CHECK_FLOAT(scales, "scale(s)");
  NVLM_CHECK_CONTIGUOUS(qweight, "qweight");
  NVLM_CHECK_CONTIGUOUS(scales, "scale(s)");
  if (bias.has_value()) {
    NVLM_CHECK_SAME_DEVICE(x, "x", *bias, "bias");
    NVLM_CHECK_FLOAT(*bias, "bias");
    NVLM_CHECK_ARG(bias->dim() == 1 && bias->size(0) == n, "bias", "must have shape [", n, "], got ", bias->sizes());
  }
}

struct QuantShape {
  int64_t n, k;  // output features N, input features K
};

// w8a16_linear: qweight int8 [N, K], scale [N] (csrc/common/quant_layout.h). Returns (N, K).
inline QuantShape check_w8a16_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& bias) {
  NVLM_CHECK_ARG(qweight.scalar_type() == at::kChar, "qweight", "must be int8, got ", qweight.scalar_type());
  NVLM_CHECK_DIM(qweight, "qweight", 2);
  const int64_t n = qweight.size(0), k = qweight.size(1);
  check_quant_linear_common("w8a16_linear", x, qweight, scale, bias, n, k);
  NVLM_CHECK_ARG(scale.dim() == 1 && scale.size(0) == n, "scale", "must have shape [", n, "], got ", scale.sizes());
  return {n, k};
}

// w4a16_linear: qweight uint8 [N, K/2], scales [N, K/g], zeros uint8 [N, K/g], g in {32, 64, 128}. Returns (N, K).
inline QuantShape check_w4a16_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t group_size,
                                   const std::optional<at::Tensor>& bias) {
  NVLM_CHECK_ARG(qweight.scalar_type() == at::kByte, "qweight", "must be uint8 (two int4 per byte), got ",
                 qweight.scalar_type());
  NVLM_CHECK_DIM(qweight, "qweight", 2);
  const int64_t n = qweight.size(0), k = 2 * qweight.size(1);
  NVLM_CHECK_ARG(quant::valid_group_size(group_size), "group_size", "must be 32, 64 or 128, got ", group_size);
  NVLM_CHECK_ARG(k % group_size == 0, "group_size", "K=", k, " is not a multiple of group_size=", group_size);
  check_quant_linear_common("w4a16_linear", x, qweight, scales, bias, n, k);
  const int64_t g = k / group_size;
  NVLM_CHECK_ARG(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == g, "scales", "must have shape [", n,
                 ", ", g, "], got ", scales.sizes());
  NVLM_CHECK_ARG(zeros.scalar_type() == at::kByte, "zeros", "must be uint8, got ", zeros.scalar_type());
  NVLM_CHECK_ARG(zeros.dim() == 2 && zeros.size(0) == n && zeros.size(1) == g, "zeros", "must have shape [", n, ", ",
                 g, "], got ", zeros.sizes());
  NVLM_CHECK_CONTIGUOUS(zeros, "zeros");
  NVLM_CHECK_SAME_DEVICE(x, "x", zeros, "zeros");
  return {n, k};
}

}  // namespace nvlm
