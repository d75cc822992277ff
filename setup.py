"""Build nvlm-kernels: one extension, ``nvlm_kernels._C``.

* ``csrc/ops.cpp`` + ``csrc/cpu/*.cpp`` are always built (g++, OpenMP). AVX-512/AVX2 code is selected at run time
  (``__builtin_cpu_supports``), never with ``-march=native``, so a wheel runs on any x86-64 machine.
* ``csrc/cuda/*.cu`` are added when torch has CUDA and nvcc is found (sm_80 and sm_90a unless
  ``TORCH_CUDA_ARCH_LIST`` says otherwise). ``NVLM_KERNELS_SKIP_CUDA=1`` builds the CPU part only.

Install with ``pip install --no-build-isolation -e .``: build isolation would pull a second torch into the build
environment and produce a module linked against the wrong one (see shared/docs/build_notes.md).
"""

import glob
import os
import shutil
import sys

# /usr/local/bin/nvcc is a wrapper script; torch would guess CUDA_HOME=/usr/local and fail to link cudart.
# Point it at the toolkit root *before* torch.utils.cpp_extension is imported (it reads CUDA_HOME at import).
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", "2")  # each nvcc job peaks near 1.5 GB; the dev machine has 2 cores

from setuptools import find_packages, setup  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_reason():
    """Return None when the CUDA sources should be built, else the reason they are skipped."""
    if os.environ.get("NVLM_KERNELS_SKIP_CUDA", "0") == "1":
        return "NVLM_KERNELS_SKIP_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME)"
    return None


def _nvidia_include_dirs():
    """cuBLAS/cuSPARSE/cuSOLVER headers included by ATen/cuda come from torch's nvidia wheels, not /usr/local/cuda."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d)]
    return sorted(set(dirs))


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    common = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-DNVLM_KERNELS_BUILD"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    reason = _cuda_build_reason()
    if reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v",
                      "-DNVLM_KERNELS_WITH_CUDA"]
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"nvlm-kernels: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}")
        ext = CUDAExtension(
            "nvlm_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=common + _nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DNVLM_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"nvlm-kernels: building CPU kernels only ({reason})", file=sys.stderr)
        ext = CppExtension("nvlm_kernels._C", sources, include_dirs=common,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


setup(
    packages=find_packages(include=["nvlm_kernels*", "nvlm*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
