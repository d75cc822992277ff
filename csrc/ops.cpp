// Every nvlm_kernels:: schema, in one place. Implementations register themselves per dispatch key in their own
// files (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fakes (meta) are registered from Python next to each
// op's reference (nvlm_kernels/<op>.py). Triton kernels are separate Python-defined ops (`<op>_triton`) so that
// they exist even when this extension was not built.
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_features.h"

TORCH_LIBRARY(nvlm_kernels, m) {
  // Pixel shuffle (downsample 0.5) of ViT tiles: x [T, N, C] (N = s*s, s even) -> [T, N/4, 4C].
  // version: 1 or 2 (ps_version "v1"/"v2" of the checkpoint config).
  m.def("pixel_shuffle(Tensor x, int version) -> Tensor");
  // The shuffle fused with the projector's LayerNorm over the 4C output channels (fp32 statistics).
  m.def("pixel_shuffle_layernorm(Tensor x, Tensor weight, Tensor bias, float eps, int version) -> Tensor");
  // Weight-only int8 (per output channel, symmetric): x [..., K], qweight int8 [N, K], scale [N] -> [..., N].
  m.def("w8a16_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  // Weight-only int4 (group-wise, integer zero point): qweight uint8 [N, K/2] (low nibble = even k),
  // scales [N, K/g], zeros uint8 [N, K/g]; w = (q - z) * s.
  m.def("w4a16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
}

// A plain CPython module so `import nvlm_kernels._C` loads the library (running the registrations above) and
// answers what the build holds, without pulling pybind11 into every translation unit.
namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(nvlm::cpu_capability_name(nvlm::cpu_capability()));
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef NVLM_KERNELS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "Best SIMD level the CPU kernels use here: avx512|avx2|scalar."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when csrc/cuda was compiled into this extension."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nvlm-kernels compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
