"""Build script: the Python package, plus the optional native extension ``fused_resnet._C`` (csrc/).

What gets built (env variables, all optional):
  FUSED_RESNET_SKIP_EXT=1   pure-Python install, no extension (the ``native`` backend is then absent).
  FORCE_CUDA=1              build the CUDA sources even without a visible GPU (needs a CUDA torch and
                            a toolkit at CUDA_HOME); by default they are built when torch is a CUDA
                            build and a toolkit is found, GPU or not.
  FUSED_RESNET_SKIP_CUDA=1  CPU kernels only, even with a CUDA torch and toolkit.
  TORCH_CUDA_ARCH_LIST      CUDA targets, e.g. "8.0;9.0" (default when no GPU is visible: "8.0;9.0+PTX").
  MAX_JOBS                  parallel compile jobs (default: bounded by cores and by memory, ~1.5 GB each).
  FUSED_RESNET_DEBUG=1      -O0 -g host code.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build uses the torch that is
already installed: the extension is tied to that torch version (see the README).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> int:
    """One job per core, but no more than memory allows (a job peaks at ~1.5 GB)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()}
        mem_gb = info.get("MemAvailable", info.get("MemTotal", 0)) / 2**20
        return max(1, min(cores, int(mem_gb / 1.5)))
    except (OSError, ValueError):
        return max(1, min(cores, 4))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def _extensions():
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    with_cuda = not _flag("FUSED_RESNET_SKIP_CUDA") and torch.version.cuda is not None and (
        _flag("FORCE_CUDA") or cpp_extension.CUDA_HOME is not None
    )
    if _flag("FORCE_CUDA") and not with_cuda and not _flag("FUSED_RESNET_SKIP_CUDA"):
        raise RuntimeError(
            "FORCE_CUDA=1 but torch is a CPU-only build (torch.version.cuda is None): install a CUDA torch "
            "or drop FORCE_CUDA to build the CPU extension only."
        )
    version = torch.__version__.split("+")[0]
    opt = ["-O0", "-g"] if _flag("FUSED_RESNET_DEBUG") else ["-O3", "-g0"]
    # at::parallel_for is OpenMP code inlined from the headers: without -fopenmp it would not compile.
    cxx = opt + ["-fopenmp", f"-DFR_TORCH_VERSION={version}"]
    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    # Every csrc file is a `depends`: headers and (in a CPU build) the CUDA sources then go into the
    # sdist, so that it builds with or without CUDA, and a change to a header rebuilds the extension.
    depends = _sources("**/*.h") + _sources("cuda/*.cpp") + _sources("cuda/*.cu")
    kwargs = {"name": "fused_resnet._C", "extra_link_args": ["-fopenmp"], "depends": depends}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DFR_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            sources=sources + _sources("cuda/*.cpp") + _sources("cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DFR_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
