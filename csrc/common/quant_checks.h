// Argument checks shared by the CPU and CUDA launchers of w8a16_linear / w4a16_linear (host code only).
#pragma once

#include <optional>

#include "common/checks.h"

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

}  // namespace nvlm
