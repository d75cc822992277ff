// Argument checks shared by the CPU and CUDA launchers. TORCH_CHECK_VALUE surfaces in Python as ValueError, so a
// bad argument raises the same exception type whether the C++ kernel, the Triton launcher or the reference saw it.
#pragma once

#include <ATen/ATen.h>

#define NVLM_CHECK_ARG(cond, name, ...) TORCH_CHECK_VALUE(cond, "nvlm_kernels: argument '", name, "': ", __VA_ARGS__)

#define NVLM_CHECK_CONTIGUOUS(t, name) \
  NVLM_CHECK_ARG((t).is_contiguous(), name, "must be contiguous (got strides ", (t).strides(), ")")

#define NVLM_CHECK_DIM(t, name, d) \
  NVLM_CHECK_ARG((t).dim() == (d), name, "must have ", d, " dimensions, got shape ", (t).sizes())

#define NVLM_CHECK_FLOAT(t, name)                                                                  \
  NVLM_CHECK_ARG((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||             \
                     (t).scalar_type() == at::kBFloat16,                                           \
                 name, "must be float32, float16 or bfloat16, got ", (t).scalar_type())

#define NVLM_CHECK_SAME_DEVICE(a, an, b, bn)                                                       \
  NVLM_CHECK_ARG((a).device() == (b).device(), bn, "must be on the same device as '", an, "' (", \
                 (a).device(), "), got ", (b).device())
