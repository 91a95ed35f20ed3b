"""Build script: the Python package, plus the optional native extension ``fused_resnet._C`` (csrc/).

What gets built (env variables, all optional):
  FUSED_RESNET_SKIP_EXT=1   pure-Python install, no extension (the ``native`` backend is then absent).
  CUDA_HOME / CUDA_PATH     the CUDA toolkit root (holding include/cuda_runtime.h and bin/nvcc). Unset: the
                            first toolkit among torch's guess, /usr/local/cuda and the toolkit of the nvcc on
                            PATH (through symlinks and `exec .../bin/nvcc` wrapper scripts).
  FORCE_CUDA=1              the CUDA kernels or an error: a CUDA torch and a toolkit are required. By default
                            they are built when torch is a CUDA build and a toolkit is found, GPU or not, and
                            otherwise the CPU kernels only, with a warning; the extension then says why
                            (``_C.CUDA_SKIP_REASON``, shown by ``python -m fused_resnet info``).
  FUSED_RESNET_SKIP_CUDA=1  CPU kernels only, even with a CUDA torch and toolkit.
  TORCH_CUDA_ARCH_LIST      CUDA targets, e.g. "8.0;9.0" (default when no GPU is visible: "8.0;9.0+PTX").
  MAX_JOBS                  parallel compile jobs (default: bounded by cores and by memory, ~1.5 GB each).
  FUSED_RESNET_DEBUG=1      -O0 -g host code.
  FUSED_RESNET_LOCAL_VERSION=1  a local version label naming the torch and CUDA the extension is built against
                            (``0.1.0+torch2.14.1cu130``, ``0.1.0+torch2.13.0cpu``): scripts/build_cuda_wheels.sh.

With the extension, the distribution requires exactly the torch it is built against (``torch==2.14.1``, which
any local build of it such as ``2.14.1+cu130`` satisfies): pip installs that torch with it; `pip check` flags another.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build uses the torch that is
already installed: the extension is tied to that torch version (see the README).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

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


def _is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit root: the runtime headers and nvcc (a bare nvcc or a runtime without headers won't build)."""
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and os.access(
        os.path.join(root, "bin", "nvcc"), os.X_OK
    )


def _nvcc_toolkit() -> str | None:
    """The toolkit of the nvcc on PATH, following symlinks and one-line wrapper scripts
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), which torch takes for the toolkit itself."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    roots = [os.path.dirname(os.path.dirname(nvcc))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            roots += [m.decode() for m in re.findall(rb"(/[^\s'\"]+)/bin/nvcc\b", head)]
    except OSError:
        pass
    return next((root for root in roots if _is_toolkit(root)), None)


def _find_cuda_toolkit(torch_guess: str | None) -> tuple[str | None, str]:
    """The CUDA toolkit root to build with, or None and why none was taken.

    An explicit CUDA_HOME / CUDA_PATH is never overridden by a guess: if it is not a toolkit, no CUDA
    kernels are built (the warning says so) rather than kernels from some other toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return root, ""
            return None, f"{var}={root} is not a CUDA toolkit (no include/cuda_runtime.h or bin/nvcc there)"
    for root in (torch_guess, "/usr/local/cuda", _nvcc_toolkit()):
        if _is_toolkit(root):
            return os.path.realpath(root), ""
    return None, (
        f"no CUDA toolkit with headers was found (CUDA_HOME unset; torch's guess {torch_guess}, /usr/local/cuda "
        f"and the nvcc on PATH ({shutil.which('nvcc')}) hold no include/cuda_runtime.h and bin/nvcc)"
    )


def _cuda_plan(torch, cpp_extension) -> tuple[bool, str]:
    """Whether to build the CUDA kernels and, if not, why (compiled into the extension as CUDA_SKIP_REASON).
    With a toolkit found, CUDA_HOME and cpp_extension.CUDA_HOME (read when the build runs) point at it."""
    version = torch.__version__
    if _flag("FUSED_RESNET_SKIP_CUDA"):
        return False, "FUSED_RESNET_SKIP_CUDA=1 was set at build time"
    if torch.version.cuda is None:
        if _flag("FORCE_CUDA"):
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {version} is a CPU-only build (torch.version.cuda is None): install a "
                "CUDA torch or drop FORCE_CUDA to build the CPU extension only."
            )
        return False, f"torch {version} is a CPU-only build"
    root, why = _find_cuda_toolkit(cpp_extension.CUDA_HOME)
    if root is None:
        reason = (f"torch {version} is a CUDA build but {why}; set CUDA_HOME to the toolkit root (the directory "
                  "holding include/cuda_runtime.h and bin/nvcc) and rebuild")
        if _flag("FORCE_CUDA"):
            raise RuntimeError(f"FORCE_CUDA=1 but no CUDA kernels can be built: {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    print(f"fused_resnet: building the CUDA kernels with the toolkit at {root} (torch {version}, CUDA "
          f"{torch.version.cuda})", file=sys.stderr)
    return True, ""


def _warn(message: str) -> None:
    """A build-time warning that stands out in the compiler output (pip shows it with -v)."""
    bar = "!" * 100
    print(f"\n{bar}\nWARNING (fused_resnet): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _c_string(text: str) -> str:
    """``text`` as a C string literal (octal escapes for anything but printable ASCII, quotes, backslashes)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?' else f"\\{b:03o}"
                         for b in text.encode()) + '"'


def _build_ext_class(cpp_extension, skip_reason: str):
    """torch's BuildExtension (ninja), plus a generated header ``fr_build_info.h`` in the build's temp dir:
    it carries text no -D flag carries safely through ninja and the shell (why no CUDA kernels were built)."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extensions(self):
            gen = os.path.join(os.path.abspath(self.build_temp), "fr_generated")
            os.makedirs(gen, exist_ok=True)
            header = os.path.join(gen, "fr_build_info.h")
            text = f"// Generated by setup.py.\n#define FR_CUDA_SKIP_REASON {_c_string(skip_reason)}\n"
            old = None
            if os.path.exists(header):
                with open(header) as f:
                    old = f.read()
            if old != text:  # rewritten only on change: ninja's depfiles then rebuild only what includes it
                with open(header, "w") as f:
                    f.write(text)
            for ext in self.extensions:
                ext.include_dirs.append(gen)
            super().build_extensions()

    return BuildExtension


def _build_base(torch) -> str:
    """build/ per torch (``build/torch2.14.1-cu130``): objects, and setuptools' "up to date" check of the
    built library, are then never those of another torch, whose ABI the extension would not match."""
    return os.path.join("build", "torch" + torch.__version__.replace("+", "-"))


def _extensions():
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return [], {}, {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    with_cuda, skip_reason = _cuda_plan(torch, cpp_extension)
    _BUILT["cuda"] = with_cuda
    if not with_cuda and torch.version.cuda is not None:
        _warn(f"building the CPU kernels only: {skip_reason}.")
    version = torch.__version__.split("+")[0]
    opt = ["-O0", "-g"] if _flag("FUSED_RESNET_DEBUG") else ["-O3", "-g0"]
    # at::parallel_for is OpenMP code inlined from the headers: without -fopenmp it would not compile.
    cxx = opt + ["-fopenmp", f"-DFR_TORCH_VERSION={version}", "-DFR_HAVE_BUILD_INFO"]
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
    # Defaults only: setup.cfg, DIST_EXTRA_CONFIG and the command line (--build-temp, ...) override them.
    options = {"build": {"build_base": _build_base(torch)}}
    return [ext], {"build_ext": _build_ext_class(cpp_extension, skip_reason)}, options


_BUILT: dict[str, bool] = {}  # whether the extension gets the CUDA kernels (set by _extensions)


def _metadata() -> dict:
    """The version (``fused_resnet.__version__``, with FUSED_RESNET_LOCAL_VERSION=1 a local label naming the
    torch and the CUDA kernels built, or cpu) and the torch requirement: exactly the torch the extension is built
    against, any torch >= 2.4 without the extension."""
    with open(os.path.join(ROOT, "fused_resnet", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return {"version": version, "install_requires": ["torch>=2.4"]}
    import torch

    built = torch.__version__.split("+")[0]
    if _flag("FUSED_RESNET_LOCAL_VERSION"):
        cuda = "cu" + torch.version.cuda.replace(".", "") if _BUILT.get("cuda") else "cpu"
        version += f"+torch{built}{cuda}"
    return {"version": version, "install_requires": [f"torch=={built}"]}


ext_modules, cmdclass, options = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options, **_metadata())
